"""``fastdiff eval``: sample quality measured with the shipped digit classifier.

For class-conditional models: the fraction of samples classified as the requested digit. For every model: the
class histogram and the Fréchet distance between classifier features (penultimate layer) of the samples and of
the held-out real digits, next to the same distance between real train and real held-out digits for scale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from fastdiff.hub import ASSETS

CLASSIFIER = ASSETS / "digits-classifier"


def load_classifier(path: Optional[Path] = None):
    from fastdiff.models.classifier import DigitClassifier

    return DigitClassifier.from_pretrained(path or CLASSIFIER).eval()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2(Σ_a Σ_b)^½) between two (n, d) feature sets, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr((Σ_a Σ_b)^½) = Σ √λ_i of the symmetric PSD matrix Σ_a^½ Σ_b Σ_a^½
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    tr_sqrt = np.sqrt(np.clip(lam, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt)


@torch.no_grad()
def _features_and_predictions(classifier, images: torch.Tensor, batch: int = 512):
    feats, preds = [], []
    for i in range(0, len(images), batch):
        f = classifier.features(images[i:i + batch].float())
        feats.append(f)
        preds.append(classifier.head(f).argmax(1))
    return torch.cat(feats).numpy(), torch.cat(preds)


def evaluate(pipe, num: int = 500, steps: Optional[int] = None, guidance: Optional[float] = None, seed: int = 0,
             batch_size: int = 250, progress: bool = True, model: Optional[str] = None) -> dict:
    """Sample ``num`` images from ``pipe`` and score them. Class-conditional models get labels i mod 10. ``steps``
    and ``guidance`` default to the model's own (``settings``: e.g. 25 DDIM steps, or 4 LCM steps)."""
    from fastdiff.data import load_digits
    from fastdiff.hub import sampling_defaults

    classifier = load_classifier()
    unet = getattr(pipe, "unet", None)
    defaults = sampling_defaults(pipe, steps=steps if unet is not None else None, guidance=guidance, model=model)
    steps, guidance = defaults.steps, defaults.guidance
    labels = defaults.class_labels(range(num))
    labels = None if labels is None else torch.tensor(labels)
    generator = torch.Generator("cpu").manual_seed(seed)
    images = []
    for start in range(0, num, batch_size):
        n = min(batch_size, num - start)
        kwargs = {"batch_size": n, "generator": generator, "output_type": "pt", "progress": progress,
                  **defaults.call_kwargs()}
        if labels is not None:
            kwargs["class_labels"] = labels[start:start + n]
        images.append(pipe(**kwargs) * 2 - 1)  # back to [−1, 1], the classifier's input range
    images = torch.cat(images)
    feats, preds = _features_and_predictions(classifier, images)
    train_x, _ = load_digits("train")
    test_x, _ = load_digits("test")
    train_feats, _ = _features_and_predictions(classifier, train_x)
    test_feats, _ = _features_and_predictions(classifier, test_x)
    report = {
        "num": num,
        "dtype": str(pipe.dtype).replace("torch.", ""),
        "steps": steps,
        "sampler": type(pipe.scheduler).__name__ if unet is not None else None,
        "guidance": guidance,
        "histogram": torch.bincount(preds, minlength=10).tolist(),
        "fd": frechet_distance(feats, test_feats),
        "fd_real": frechet_distance(train_feats, test_feats),
    }
    if labels is not None:
        report["accuracy"] = float((preds == labels).float().mean())
    report["fd_ratio"] = report["fd"] / report["fd_real"]
    return report


def format_report(name: str, report: dict) -> str:
    lines = [f"model {name}: {report['num']} samples"
             + (f", {report['dtype']}" if report.get("dtype") else "")
             + (f", {report['steps']} steps" if report.get("steps") else "")
             + (f", guidance {report['guidance']}" if report.get("guidance") is not None else "")]
    if "accuracy" in report:
        lines.append(f"  classified as the requested digit: {100 * report['accuracy']:.1f}%")
    lines.append("  class histogram (0-9): " + " ".join(str(c) for c in report["histogram"]))
    lines.append(f"  Fréchet distance (classifier features) vs held-out digits: {report['fd']:.3f}  "
                 f"(real train vs held-out: {report['fd_real']:.3f}; ratio {report['fd_ratio']:.2f})")
    return "\n".join(lines)
