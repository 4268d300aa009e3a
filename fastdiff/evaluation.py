"""``fastdiff eval``: sample quality measured with the shipped digit classifier.

For class-conditional models: the fraction of samples classified as the requested digit. For every model: the
class histogram and the Fréchet distance between classifier features (penultimate layer) of the samples and of
the held-out real digits, next to the same distance between real train and real held-out digits for scale.

``fastdiff eval --sweep`` (:func:`sweep`): that quality next to the sampling speed, for every sampler of every
shipped diffusion model over a ladder of step counts, resumable from a JSON results file; :func:`format_sweep`
(a Markdown table), :func:`plot_sweep` (a PNG chart) and :func:`headline` summarise it. :func:`evaluate` and
:func:`sweep` sample and score through the same two helpers (:func:`sample_images`, :func:`score_images`).
"""

from __future__ import annotations

import io
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from fastdiff.hub import ASSETS

CLASSIFIER = ASSETS / "digits-classifier"
SWEEP_LADDER = (1, 2, 4, 8, 15, 25, 50)
WARMUP_IMAGES = 10  # the untimed call before each timed sweep row
# what makes two sweep rows the same measurement (a results file's rows with this key are reused, not recomputed)
SWEEP_KEY = ("model", "sampler", "steps", "num", "seed", "guidance", "dtype", "device")
# the keys of a sweep row with measurements (an error row has "error" instead of unet_calls_per_image … ms_per_image)
SWEEP_ROW_KEYS = ("model", "sampler", "scheduler", "steps", "unet_calls_per_image", "guidance", "num", "seed", "dtype",
                  "device", "accuracy", "fd", "fd_real", "fd_ratio", "seconds", "images_per_s", "ms_per_image",
                  "torch", "cpu", "threads")


def load_classifier(path: Optional[Path] = None):
    """The shipped digit classifier (or the one saved in ``path``), its weights checked against the folder's
    checksums.json when it has one."""
    from fastdiff.integrity import verify_folder
    from fastdiff.models.classifier import DigitClassifier

    folder = path or CLASSIFIER
    verify_folder(folder)
    return DigitClassifier.from_pretrained(folder).eval()


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


# --------------------------------------------------------------------------------------------- sample and score
@dataclass(frozen=True)
class RealDigits:
    """The classifier features of the real digits: ``train`` (n_train, d) and ``test`` (n_test, d) float arrays,
    and ``fd_real``, the Fréchet distance between them (the scale of "as close as real data gets")."""

    train: np.ndarray
    test: np.ndarray
    fd_real: float


def real_digits(classifier) -> RealDigits:
    """The real train and held-out digits through ``classifier`` (needs scikit-learn: the ``train`` extra)."""
    from fastdiff.data import load_digits

    train_feats, _ = _features_and_predictions(classifier, load_digits("train")[0])
    test_feats, _ = _features_and_predictions(classifier, load_digits("test")[0])
    return RealDigits(train_feats, test_feats, frechet_distance(train_feats, test_feats))


def sample_images(pipe, defaults, num: int, seed: int = 0, batch_size: int = 250,
                  progress: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor], float]:
    """Sample ``num`` images from ``pipe`` as :func:`evaluate` scores them: image i has class label i mod
    num_classes (class-conditional models), one CPU generator seeded with ``seed`` drawn through in batches of
    ``batch_size``, the steps and guidance of ``defaults`` (:func:`fastdiff.hub.sampling_defaults`).

    Returns (images (num, C, H, W) float32 CPU in [−1, 1], labels (num,) int64 or None, seconds): ``seconds`` is the
    wall time (``time.perf_counter``) of the pipeline calls alone (their output is a CPU tensor, so a GPU's work is
    finished when each call returns).
    """
    labels = defaults.class_labels(range(num))
    labels = None if labels is None else torch.tensor(labels)
    generator = torch.Generator("cpu").manual_seed(seed)
    images, seconds = [], 0.0
    for start in range(0, num, batch_size):
        n = min(batch_size, num - start)
        kwargs = {"batch_size": n, "generator": generator, "output_type": "pt", "progress": progress,
                  **defaults.call_kwargs()}
        if labels is not None:
            kwargs["class_labels"] = labels[start:start + n]
        begin = time.perf_counter()
        out = pipe(**kwargs)
        seconds += time.perf_counter() - begin
        images.append(out * 2 - 1)  # back to [−1, 1], the classifier's input range
    return torch.cat(images), labels, seconds


def score_images(classifier, images: torch.Tensor, labels: Optional[torch.Tensor], real: RealDigits) -> dict:
    """Score (N, C, H, W) images in [−1, 1]: {"histogram": 10 counts of the predicted classes, "fd": Fréchet
    distance to the held-out digits' features, "fd_real": real train vs held-out, "accuracy": fraction classified as
    ``labels`` (only when labels are given), "fd_ratio": fd / fd_real}."""
    feats, preds = _features_and_predictions(classifier, images)
    scores = {
        "histogram": torch.bincount(preds, minlength=10).tolist(),
        "fd": frechet_distance(feats, real.test),
        "fd_real": real.fd_real,
    }
    if labels is not None:
        scores["accuracy"] = float((preds == labels).float().mean())
    scores["fd_ratio"] = scores["fd"] / scores["fd_real"]
    return scores


def evaluate(pipe, num: int = 500, steps: Optional[int] = None, guidance: Optional[float] = None, seed: int = 0,
             batch_size: int = 250, progress: bool = True, model: Optional[str] = None) -> dict:
    """Sample ``num`` images from ``pipe`` and score them. Class-conditional models get labels i mod 10. ``steps``
    and ``guidance`` default to the model's own (``settings``: e.g. 25 DDIM steps, or 4 LCM steps).

    Returns {"num", "dtype", "steps", "sampler" (the scheduler's class name, None for a GAN), "guidance",
    "histogram", "fd", "fd_real", "accuracy" (class-conditional models only), "fd_ratio"}."""
    from fastdiff.hub import sampling_defaults

    classifier = load_classifier()
    unet = getattr(pipe, "unet", None)
    defaults = sampling_defaults(pipe, steps=steps if unet is not None else None, guidance=guidance, model=model)
    images, labels, _ = sample_images(pipe, defaults, num, seed=seed, batch_size=batch_size, progress=progress)
    report = {
        "num": num,
        "dtype": _dtype_name(pipe),
        "steps": defaults.steps,
        "sampler": type(pipe.scheduler).__name__ if unet is not None else None,
        "guidance": defaults.guidance,
    }
    report.update(score_images(classifier, images, labels, real_digits(classifier)))
    return report


# --------------------------------------------------------------------------------------------- text prompts
ATTRIBUTE_PROMPTS = {  # the attribute eval's prompt per attribute word, {d}: the digit's numeral
    "thin": "a thin {d}",
    "bold": "a bold {d}",
    "slanted left": "the digit {d}, slanted left",
    "upright": "the digit {d}, upright",
    "slanted right": "the digit {d}, slanted right",
}
PROMPT_TARGETS = {"accuracy": 0.95, "bold_thin_mass_ratio": 1.3, "fd_ratio": 3.0}


def _prompt_samples(pipe, prompts: list[str], seed: int, steps: int, guidance: Optional[float], batch_size: int,
                    progress: bool, negative: Optional[str] = None,
                    per_batch: Optional[Callable[[slice], dict]] = None) -> torch.Tensor:
    """Images (N, 1, H, W) in [−1, 1] for ``prompts``, one CPU generator seeded with ``seed`` drawn through in
    batches (so two prompt lists of one length get the same initial noises). ``per_batch(batch slice)``: more call
    arguments for the prompts of that batch (a control map, an image prompt)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = slice(start, start + batch_size)
        kwargs = {"negative_prompt": negative} if negative is not None else {}
        if per_batch is not None:
            kwargs.update(per_batch(batch))
        out.append(pipe(prompt=prompts[batch], num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                        output_type="pt", progress=progress, **kwargs) * 2 - 1)
    return torch.cat(out)


def evaluate_prompts(pipe, num: int = 500, per_attribute: int = 200, steps: Optional[int] = None,
                     guidance: Optional[float] = None, seed: int = 0, batch_size: int = 250,
                     progress: bool = True) -> dict:
    """Prompt adherence of a text-to-image pipeline (``fastdiff eval`` of a TextToImagePipeline such as digits-sd).

    1. digits: ``num`` prompts naming digit i mod 10 only (random captions of :func:`fastdiff.prompts.make_prompt`
       without attribute words, seeded): the share classified as that digit, the class histogram and the Fréchet
       distance to the held-out digits (as :func:`evaluate`);
    2. attributes: for each word of :data:`ATTRIBUTE_PROMPTS`, ``per_attribute`` prompts (digits cycling) from the
       same initial noises: the mean measured ``mass`` and ``slant`` (:func:`fastdiff.prompts.digit_attributes`) and
       the share classified as the named digit;
    3. negative prompts: the prompts "0" … "9" (``per_attribute`` of them) with no negative prompt and with the
       negative prompts "bold" and "thin", same noises: the mean mass of each.

    Returns the scores with ``targets`` (:func:`prompt_targets`). ``steps``/``guidance`` default to the model's.
    """
    from fastdiff.hub import sampling_defaults
    from fastdiff.prompts import DIGIT_WORDS, digit_attributes, make_prompt
    from fastdiff.validation import check_positive_int

    num = check_positive_int("num", num)
    per_attribute = check_positive_int("per_attribute", per_attribute)
    defaults = sampling_defaults(pipe, steps=steps, guidance=guidance)
    steps, guidance = defaults.steps, defaults.guidance
    classifier = load_classifier()
    real = real_digits(classifier)

    def run(prompts, negative=None):
        return _prompt_samples(pipe, prompts, seed, steps, guidance, batch_size, progress, negative)

    caption_gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(num) % 10
    prompts = [make_prompt(int(d), None, caption_gen) for d in labels]
    report = {"num": num, "per_attribute": per_attribute, "dtype": _dtype_name(pipe), "steps": steps,
              "sampler": type(pipe.scheduler).__name__, "guidance": guidance, "example_prompts": prompts[:10]}
    report.update(score_images(classifier, run(prompts), labels, real))

    cycle = torch.arange(per_attribute) % 10
    attributes = {}
    for word, template in ATTRIBUTE_PROMPTS.items():
        images = run([template.format(d=int(d)) for d in cycle])
        attrs = digit_attributes(images)
        _, preds = _features_and_predictions(classifier, images)
        attributes[word] = {"prompt": template, "mass": float(attrs["mass"].mean()),
                            "slant": float(attrs["slant"].mean()), "accuracy": float((preds == cycle).float().mean())}
    report["attributes"] = attributes
    plain = [DIGIT_WORDS[int(d)][0] for d in cycle]
    report["negative"] = {name: float(digit_attributes(run(plain, negative))["mass"].mean())
                          for name, negative in (("none", None), ("bold", "bold"), ("thin", "thin"))}
    report["bold_thin_mass_ratio"] = attributes["bold"]["mass"] / attributes["thin"]["mass"]
    report["targets"] = prompt_targets(report)
    return report


def prompt_targets(report: dict) -> dict:
    """Which adherence targets a :func:`evaluate_prompts` report meets: {name: bool} for ≥ 95% of digit prompts
    classified as their digit, bold/thin mean-mass ratio ≥ 1.3, mean slant slanted right > upright > slanted left,
    Fréchet ratio ≤ 3, and the negative prompt "bold" lowering the mean mass (and "thin" raising it)."""
    a, neg = report["attributes"], report["negative"]
    slants = [a[k]["slant"] for k in ("slanted right", "upright", "slanted left")]
    return {
        "digit accuracy ≥ 95%": report["accuracy"] >= PROMPT_TARGETS["accuracy"],
        "bold/thin mass ≥ 1.3×": report["bold_thin_mass_ratio"] >= PROMPT_TARGETS["bold_thin_mass_ratio"],
        "slant: right > upright > left": slants[0] > slants[1] > slants[2],
        "Fréchet ratio ≤ 3": report["fd_ratio"] <= PROMPT_TARGETS["fd_ratio"],
        "negative \"bold\" lowers mass": neg["bold"] < neg["none"],
        "negative \"thin\" raises mass": neg["thin"] > neg["none"],
    }


def format_prompt_report(name: str, report: dict) -> str:
    """The :func:`evaluate_prompts` report as text lines (a Markdown table of the attributes included)."""
    lines = [f"model {name}: {report['num']} digit prompts + {report['per_attribute']} per attribute, "
             f"{report['dtype']}, {report['steps']} steps, guidance {report['guidance']}",
             f"  digit prompts classified as the named digit: {100 * report['accuracy']:.1f}%",
             "  class histogram (0-9): " + " ".join(str(c) for c in report["histogram"]),
             f"  Fréchet distance vs held-out digits: {report['fd']:.3f} (real train vs held-out: "
             f"{report['fd_real']:.3f}; ratio {report['fd_ratio']:.2f})",
             "",
             "| prompt | mean mass | mean slant (°) | named digit |",
             "|---|---:|---:|---:|"]
    for word, row in report["attributes"].items():
        lines.append(f"| `{row['prompt']}` | {row['mass']:.4f} | {row['slant']:+.2f} | {100 * row['accuracy']:.1f}% |")
    neg = report["negative"]
    lines += ["",
              f"  bold/thin mean-mass ratio: {report['bold_thin_mass_ratio']:.3f}",
              f"  negative prompts on \"0\"…\"9\": mean mass {neg['none']:.4f} (none), {neg['bold']:.4f} "
              f"(negative \"bold\"), {neg['thin']:.4f} (negative \"thin\")",
              "  targets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in report["targets"].items())]
    return "\n".join(lines)


def held_out_digits(num: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``num`` held-out digits (all 359 for None, at most all): images (n, 1, 16, 16) in [−1, 1] and labels
    (n,); ValueError unless ``num`` is a positive int. Needs scikit-learn (the ``train`` extra)."""
    from fastdiff.data import load_digits

    x, y = load_digits("test")
    if num is not None:
        from fastdiff.validation import check_positive_int

        num = min(check_positive_int("num", num), len(y))
        x, y = x[:num], y[:num]
    return x, y


def evaluate_control(pipe, num: Optional[int] = None, steps: Optional[int] = None, guidance: Optional[float] = None,
                     seed: int = 0, batch_size: int = 250, scale: float = 1.0, progress: bool = True) -> dict:
    """ControlNet adherence of a text-to-image pipeline with a ControlNet (``fastdiff eval digits-controlnet``).

    For the first ``num`` held-out digits (default: all 359): the control is the digit's edge map
    (:func:`fastdiff.control.edge_map`) and the prompt its numeral. Each is sampled with the control (scale
    ``scale``) and, as the baseline, without it (the base model with the same prompts and initial noises). Scores:
    the mean IoU and Chamfer distance between the samples' edge maps and the control, the share classified as the
    named digit, and the Fréchet distance of the controlled samples to the held-out digits.
    """
    from fastdiff.control import chamfer_distance, edge_iou, edge_map
    from fastdiff.hub import sampling_defaults

    if getattr(pipe, "controlnet", None) is None:
        raise ValueError("pipe has no controlnet: evaluate_control scores a pipeline with a ControlNet attached")
    x, y = held_out_digits(num)
    defaults = sampling_defaults(pipe, steps=steps, guidance=guidance)
    control = edge_map(x)
    prompts = [str(int(d)) for d in y]
    classifier = load_classifier()
    real = real_digits(classifier)

    def run(use_control: bool) -> torch.Tensor:
        return _prompt_samples(pipe, prompts, seed, defaults.steps, defaults.guidance, batch_size, progress,
                               per_batch=lambda b: {"image": control[b], "controlnet_conditioning_scale": scale}
                               if use_control else {})

    report = {"num": len(y), "steps": defaults.steps, "guidance": defaults.guidance, "scale": scale,
              "dtype": _dtype_name(pipe), "control": "edge map of the held-out digit, prompt = its numeral"}
    for key, images in (("controlled", run(True)), ("baseline", run(False))):
        edges = edge_map(images)
        scores = score_images(classifier, images, y, real)
        report[key] = {"iou": float(edge_iou(edges, control).mean()),
                       "chamfer": float(chamfer_distance(edges, control).mean()),
                       "accuracy": scores["accuracy"], "fd": scores["fd"], "fd_ratio": scores["fd_ratio"]}
    c, b = report["controlled"], report["baseline"]
    report["iou_ratio"] = c["iou"] / max(b["iou"], 1e-12)
    report["chamfer_ratio"] = b["chamfer"] / max(c["chamfer"], 1e-12)
    report["targets"] = {"IoU ≥ 2× the baseline": report["iou_ratio"] >= 2.0,
                         "Chamfer ≤ ½ the baseline": report["chamfer_ratio"] >= 2.0}
    return report


def format_control_report(name: str, report: dict) -> str:
    """The :func:`evaluate_control` report as text (a Markdown table: controlled vs the baseline)."""
    c, b = report["controlled"], report["baseline"]
    return "\n".join([
        f"model {name}: {report['num']} held-out digits ({report['control']}), {report['dtype']}, "
        f"{report['steps']} steps, guidance {report['guidance']}, conditioning scale {report['scale']}",
        "",
        "| sampling | edge IoU with the control ↑ | Chamfer distance (px) ↓ | named digit | Fréchet ratio |",
        "|---|---:|---:|---:|---:|",
        f"| with the edge map | {c['iou']:.3f} | {c['chamfer']:.3f} | {100 * c['accuracy']:.1f}% | "
        f"{c['fd_ratio']:.2f} |",
        f"| without (the base model, same prompts and noises) | {b['iou']:.3f} | {b['chamfer']:.3f} | "
        f"{100 * b['accuracy']:.1f}% | {b['fd_ratio']:.2f} |",
        "",
        f"  IoU {report['iou_ratio']:.2f}× the baseline's, Chamfer distance {report['chamfer_ratio']:.2f}× lower",
        "  targets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in report["targets"].items()),
    ])


def _to_pixels(images: torch.Tensor):
    """(N, 1, H, W) in [−1, 1] → (N, H, W) uint8 numpy."""
    return ((images[:, 0] + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()


def labeled_grid(rows: Sequence, labels: Sequence[str], path, scale: int = 4) -> Path:
    """Write a PNG: one row per entry of ``rows`` ((N, H, W) uint8 arrays, N the same in every row), its label on
    the left, each image enlarged ``scale`` times (nearest). Returns the path (written atomically)."""
    from PIL import Image, ImageDraw

    from fastdiff.files import write_atomic

    h, w = rows[0].shape[1:]
    columns = max(len(r) for r in rows)
    cell, pad, label = h * scale, 2, 6 * max(len(t) for t in labels) + 12
    grid = Image.new("L", (label + columns * (w * scale + pad) + pad, len(rows) * (cell + pad) + pad), color=0)
    draw = ImageDraw.Draw(grid)
    for r, (text, row) in enumerate(zip(labels, rows)):
        top = pad + r * (cell + pad)
        draw.text((6, top + cell // 2 - 6), text, fill=255)
        for c, pixels in enumerate(row):
            im = Image.fromarray(pixels, mode="L").resize((w * scale, cell), Image.NEAREST)
            grid.paste(im, (label + pad + c * (w * scale + pad), top))
    path = Path(path)
    write_atomic(path, lambda tmp: grid.save(tmp, format="PNG"))
    return path


def prompt_grid(pipe, prompts: Sequence[str], path, columns: int = 8, seed: int = 0, steps: Optional[int] = None,
                guidance: Optional[float] = None, scale: int = 4, negative_prompt: Optional[str] = None) -> Path:
    """Write a PNG of a text-to-image pipeline's samples: one row per prompt, its text on the left, ``columns``
    samples per row from the same ``columns`` initial noises in every row (so rows differ by the prompt alone);
    each 16×16 image enlarged ``scale`` times. Returns the path (written atomically)."""
    from fastdiff.hub import sampling_defaults
    from fastdiff.validation import check_positive_int

    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of str")
    columns = check_positive_int("columns", columns)
    scale = check_positive_int("scale", scale)
    defaults = sampling_defaults(pipe, steps=steps, guidance=guidance)
    rows = [_to_pixels(_prompt_samples(pipe, [prompt] * columns, seed, defaults.steps, defaults.guidance, columns,
                                       False, negative_prompt)) for prompt in prompts]
    return labeled_grid(rows, prompts, path, scale)


def control_grid(pipe, path, num: int = 10, seed: int = 0, prompts: Sequence[str] = ("{d}", "a bold {d}"),
                 scale: int = 4) -> Path:
    """Write a PNG of a ControlNet pipeline: the first ``num`` held-out digits, their edge maps (the control), the
    samples for each of ``prompts`` ({d}: the digit) with the map, and the first prompt's samples without it (the
    same initial noises). Returns the path."""
    from fastdiff.control import edge_map
    from fastdiff.data import load_digits
    from fastdiff.hub import sampling_defaults

    x, y = load_digits("test")
    x, y = x[:num], y[:num]
    control = edge_map(x)
    defaults = sampling_defaults(pipe)

    def run(template, **extra):
        generator = torch.Generator("cpu").manual_seed(seed)
        return _to_pixels(pipe(prompt=[template.format(d=int(d)) for d in y], num_inference_steps=defaults.steps,
                               guidance_scale=defaults.guidance, generator=generator, output_type="pt",
                               progress=False, **extra) * 2 - 1)

    rows = [_to_pixels(x), _to_pixels(control * 2 - 1)]
    labels = ["held-out digit", "its edge map (control)"]
    for template in prompts:
        rows.append(run(template, image=control))
        labels.append(f'"{template}" + control')
    rows.append(run(prompts[0]))
    labels.append(f'"{prompts[0]}", no control')
    return labeled_grid(rows, labels, path, scale)


# --------------------------------------------------------------------------------------------- image prompts
IP_TARGETS = {"accuracy": 0.90, "bold_thin_mass_ratio": 1.2}


def evaluate_image_prompts(pipe, num: Optional[int] = None, steps: Optional[int] = None,
                           guidance: Optional[float] = None, seed: int = 0, batch_size: int = 250,
                           scale: Optional[float] = None, progress: bool = True) -> dict:
    """IP-Adapter adherence of a text-to-image pipeline with an IP-Adapter (``fastdiff eval digits-ip-adapter``).

    For the first ``num`` held-out digits (default: all 359): the image prompt is the digit itself, the text prompt
    is empty (""). Each is sampled with the image prompt (``ip_adapter_scale`` = ``scale``, default the model's) and,
    as the baseline, without it (the base model with the empty prompt and the same initial noises). Scores:

    - ``accuracy``: the share of samples the shipped classifier puts in the image prompt's class;
    - mass (thickness, :func:`fastdiff.prompts.digit_attributes`): the mean sample mass for the bold image prompts
      (mass above the upper quartile of the train split) over that for the thin ones (at most the lower quartile)
      — ``bold_thin_mass_ratio`` — and the Pearson correlation of prompt and sample mass over all prompts; the same
      ratio of the prompt images themselves (``prompt_bold_thin_mass_ratio``) for scale; slant correlation alike;
    - the Fréchet ratio of the samples to the held-out digits.
    """
    from fastdiff.hub import sampling_defaults
    from fastdiff.prompts import ATTRIBUTE_THRESHOLDS, digit_attributes

    if getattr(pipe, "ip_adapter", None) is None:
        raise ValueError("pipe has no ip_adapter: evaluate_image_prompts scores a pipeline with an IP-Adapter")
    x, y = held_out_digits(num)
    defaults = sampling_defaults(pipe, steps=steps, guidance=guidance)
    if scale is None:
        scale = float(pipe.settings.get("default_ip_adapter_scale", 1.0))
    image_prompts = (x + 1) / 2
    classifier = load_classifier()
    real = real_digits(classifier)

    def run(use_image: bool) -> torch.Tensor:
        return _prompt_samples(pipe, [""] * len(y), seed, defaults.steps, defaults.guidance, batch_size, progress,
                               per_batch=lambda b: {"ip_adapter_image": image_prompts[b], "ip_adapter_scale": scale}
                               if use_image else {})

    prompt_attrs = digit_attributes(x)
    lo, hi = ATTRIBUTE_THRESHOLDS["mass"]
    bold, thin = prompt_attrs["mass"] > hi, prompt_attrs["mass"] <= lo
    report = {"num": len(y), "steps": defaults.steps, "guidance": defaults.guidance, "scale": scale,
              "dtype": _dtype_name(pipe), "prompt": "image prompt = the held-out digit, text prompt \"\"",
              "bold_prompts": int(bold.sum()), "thin_prompts": int(thin.sum()),
              "prompt_bold_thin_mass_ratio": float(prompt_attrs["mass"][bold].mean()
                                                   / prompt_attrs["mass"][thin].mean())}

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(np.corrcoef(a.double().numpy(), b.double().numpy())[0, 1])

    for key, images in (("image_prompted", run(True)), ("baseline", run(False))):
        scores = score_images(classifier, images, y, real)
        attrs = digit_attributes(images)
        report[key] = {"accuracy": scores["accuracy"], "fd": scores["fd"], "fd_ratio": scores["fd_ratio"],
                       "histogram": scores["histogram"],
                       "bold_mass": float(attrs["mass"][bold].mean()), "thin_mass": float(attrs["mass"][thin].mean()),
                       "bold_thin_mass_ratio": float(attrs["mass"][bold].mean() / attrs["mass"][thin].mean()),
                       "mass_correlation": corr(prompt_attrs["mass"], attrs["mass"]),
                       "slant_correlation": corr(prompt_attrs["slant"], attrs["slant"])}
    ip = report["image_prompted"]
    report["targets"] = {"≥ 90% classified as the image prompt's digit": ip["accuracy"] >= IP_TARGETS["accuracy"],
                         "bold/thin image prompts: sample mass ratio ≥ 1.2":
                             ip["bold_thin_mass_ratio"] >= IP_TARGETS["bold_thin_mass_ratio"]}
    return report


def format_image_prompt_report(name: str, report: dict) -> str:
    """The :func:`evaluate_image_prompts` report as text (a Markdown table: image-prompted vs the baseline)."""
    ip, b = report["image_prompted"], report["baseline"]

    def row(label, r):
        return (f"| {label} | {100 * r['accuracy']:.1f}% | {r['bold_mass']:.4f} / {r['thin_mass']:.4f} | "
                f"{r['bold_thin_mass_ratio']:.3f} | {r['mass_correlation']:+.3f} | {r['slant_correlation']:+.3f} | "
                f"{r['fd_ratio']:.2f} |")

    return "\n".join([
        f"model {name}: {report['num']} held-out digits ({report['prompt']}), {report['dtype']}, "
        f"{report['steps']} steps, guidance {report['guidance']}, ip_adapter_scale {report['scale']}",
        "",
        "| sampling | image prompt's digit | mass: bold / thin prompts | ratio | mass corr. | slant corr. | "
        "Fréchet ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
        row("with the image prompt", ip),
        row("without (the base model, empty prompt, same noises)", b),
        "",
        f"  {report['bold_prompts']} bold and {report['thin_prompts']} thin image prompts (their own mass ratio: "
        f"{report['prompt_bold_thin_mass_ratio']:.3f})",
        "  targets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in report["targets"].items()),
    ])


def image_prompt_grid(pipe, path, num: int = 10, seed: int = 0, columns: int = 4, scale: int = 4,
                      control_prompt: bool = True) -> Path:
    """Write a PNG of an IP-Adapter pipeline: the first ``num`` held-out digits as image prompts (first row), then
    ``columns`` rows of samples with the empty text prompt (each row one initial noise); with ``control_prompt`` and a
    ControlNet on the pipeline, also the edge maps of other held-out digits of the same classes and a row of samples
    that take the layout from those maps and the rest from the image prompts. Returns the path."""
    from fastdiff.control import edge_map
    from fastdiff.data import load_digits
    from fastdiff.hub import sampling_defaults

    x, y = load_digits("test")
    prompts = x[:num]
    defaults = sampling_defaults(pipe)

    def run(k, **extra):
        generator = torch.Generator("cpu").manual_seed(seed + k)
        return _to_pixels(pipe(prompt=[""] * len(prompts), num_inference_steps=defaults.steps,
                               guidance_scale=defaults.guidance, generator=generator, output_type="pt",
                               progress=False, ip_adapter_image=(prompts + 1) / 2, **extra) * 2 - 1)

    rows, labels = [_to_pixels(prompts)], ["image prompt"]
    for k in range(columns):
        rows.append(run(k))
        labels.append(f'"" + image, seed {seed + k}')
    if control_prompt and getattr(pipe, "controlnet", None) is not None:
        # for each image prompt, the next held-out digit of its class (another writer's shape of the same digit)
        later = [next(j for j in range(i + 1, len(y)) if y[j] == y[i]) for i in range(len(prompts))]
        maps = edge_map(x[later])
        rows += [_to_pixels(maps * 2 - 1), run(0, image=maps)]
        labels += ["edge map of another", '"" + image + control']
    return labeled_grid(rows, labels, path, scale)


def _style_generator(pipe):
    g = getattr(pipe, "generator", None)
    if not hasattr(g, "mix_ws"):
        raise ValueError(f"pipe must hold a StyleGenerator (a GANPipeline of a StyleGAN), got "
                         f"{type(g).__name__ if g is not None else type(pipe).__name__}")
    return g


def _ws_and_noise(g, num: int, gen: torch.Generator):
    """``num`` w's and one set of noise maps (batch 1), drawn on the CPU with ``gen``."""
    z = torch.randn(num, g.config.latent_dim, generator=gen, device="cpu").to(g.const.device, g.const.dtype)
    return g.map(z), g.make_noise(1, generator=gen, device="cpu")


def _shared_noise(noise, batch: int, device) -> list:
    """The same noise maps for every image of a batch."""
    return [n.to(device).expand(batch, -1, -1, -1) for n in noise]


@torch.inference_mode()
def style_mixing_grid(pipe, path, num: int = 6, crossover: Optional[int] = None, seed: int = 0,
                      scale: int = 4) -> Path:
    """Write a PNG of StyleGAN style mixing: the first row holds ``num`` source-B images, the first column ``num``
    source-A images, and cell (i, j) is ``mix(w_A[i], w_B[j], crossover)``: the coarse styles (w+ rows
    < crossover: 4×4 and 8×8 by default, num_ws // 2) from A, the fine ones from B. The same noise maps in every
    image, so cells differ by their styles alone. Returns the path (written atomically)."""
    from fastdiff.validation import check_int, check_positive_int

    g = _style_generator(pipe)
    num, scale = check_positive_int("num", num), check_positive_int("scale", scale)
    crossover = g.num_ws // 2 if crossover is None else check_int("crossover", crossover, 0, g.num_ws)
    gen = torch.Generator().manual_seed(seed)
    w_a, noise = _ws_and_noise(g, num, gen)
    w_b, _ = _ws_and_noise(g, num, gen)

    def images(w1, w2, cut):
        return _to_pixels(g.mix(w1, w2, cut, _shared_noise(noise, len(w1), w1.device)).float().cpu())

    size = g.config.resolution
    blank = np.zeros((1, size, size), dtype=np.uint8)
    rows = [np.concatenate([blank, images(w_b, w_b, 0)])]
    labels = ["B:"]
    for i in range(num):
        a = w_a[i:i + 1].expand(num, -1)
        rows.append(np.concatenate([images(w_a[i:i + 1], w_a[i:i + 1], 0), images(a, w_b, crossover)]))
        labels.append(f"A{i + 1}")
    return labeled_grid(rows, labels, path, scale)


TRUNCATION_PSIS = (0.0, 0.25, 0.5, 0.7, 1.0)


@torch.inference_mode()
def truncation_strip(pipe, path, num: int = 4, psis: Sequence[float] = TRUNCATION_PSIS, seed: int = 0,
                     scale: int = 4) -> Path:
    """Write a PNG of the truncation trick: one row per z (``num``), one column per ψ in ``psis`` (w = w_avg +
    ψ·(w − w_avg): ψ = 0 is the mean-w image in every row, ψ = 1 the untruncated sample), the same noise maps
    throughout. Returns the path (written atomically)."""
    from fastdiff.validation import check_positive_int, check_real

    g = _style_generator(pipe)
    num, scale = check_positive_int("num", num), check_positive_int("scale", scale)
    psis = [check_real("psis", p) for p in psis]
    if not psis:
        raise ValueError("psis must hold at least one ψ")
    gen = torch.Generator().manual_seed(seed)
    w, noise = _ws_and_noise(g, num, gen)
    rows = []
    for i in range(num):
        ws = torch.cat([g.truncate(w[i:i + 1], p) for p in psis])
        rows.append(_to_pixels(g.synthesis(ws, _shared_noise(noise, len(psis), w.device)).float().cpu()))
    return labeled_grid(rows, [f"z{i + 1}" for i in range(num)], path, scale)


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


# --------------------------------------------------------------------------------------------- the sweep
def _dtype_name(pipe) -> str:
    return str(pipe.dtype).replace("torch.", "")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo "model name", else ``platform.processor()``, else "unknown CPU")."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def diffusion_models() -> list[str]:
    """The shipped models that sample with a diffusion scheduler (their model_index.json has a "scheduler"
    component), sorted: what :func:`sweep` covers by default (a GAN has no sampler to sweep; an extension folder such
    as digits-controlnet has no scheduler of its own: swept without its control map, it would repeat its base
    model's rows)."""
    from fastdiff.files import read_json_object
    from fastdiff.hub import list_models, model_path

    return [name for name in list_models()
            if read_json_object(model_path(name) / "model_index.json").get("scheduler") is not None]


def guidance_distilled(pipe) -> bool:
    """Whether ``pipe``'s UNet takes the guidance scale as an input (``config.guidance_embedding_dim``: the LCM
    recipe, one UNet call per step), so only the LCM sampler makes sense for it."""
    return getattr(getattr(getattr(pipe, "unet", None), "config", None), "guidance_embedding_dim", None) is not None


def default_samplers(pipe) -> list[str]:
    """The samplers :func:`sweep` tries on ``pipe`` by default: ["lcm"] for a guidance-distilled UNet, else every
    name of :data:`fastdiff.hub.SAMPLERS` but "lcm" (consistency sampling of a model not distilled for it)."""
    from fastdiff.hub import SAMPLERS

    return ["lcm"] if guidance_distilled(pipe) else [s for s in SAMPLERS if s != "lcm"]


@contextmanager
def count_unet_rows(unet):
    """Count the images the UNet evaluates while the block runs: yields a one-item list that holds the sum of the
    batch sizes of every ``unet`` forward call (a [uncond; cond] guidance batch of B images counts 2B). A forward
    pre-hook, so it sees eager calls only: not replays of CUDA graphs or a compiled copy of the UNet, which
    :func:`sweep` never turns on."""
    total = [0]

    def hook(module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        total[0] += int(x.shape[0])

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield total
    finally:
        handle.remove()


def _key(row: dict) -> tuple:
    return tuple(row.get(k) for k in SWEEP_KEY)


def _read_results(path: Path) -> list[dict]:
    """The rows of a results file (none when it does not exist); ValueError naming the file when it is not a
    results file (it is then left as it is)."""
    from fastdiff.files import read_json_object

    if not path.exists():
        return []
    data = read_json_object(path)  # ValueError naming the path for invalid JSON or a non-object
    rows = data.get("rows")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: not a sweep results file (expected {{\"rows\": [objects]}})")
    return rows


def _check_ladder(ladder) -> list[int]:
    from fastdiff.validation import check_positive_int

    if isinstance(ladder, (str, bytes)) or not isinstance(ladder, Iterable):
        raise TypeError(f"--ladder must be a sequence of step counts, got {type(ladder).__name__}")
    steps = list(dict.fromkeys(check_positive_int("--ladder", s) for s in ladder))
    if not steps:
        raise ValueError("--ladder is empty")
    return steps


def _row_line(row: dict, reused: bool = False) -> str:
    head = f"{row['model']} {row['sampler']} {row['steps']} steps: "
    if "error" in row:
        return head + f"error: {row['error']}"
    acc = "" if row.get("accuracy") is None else f"{100 * row['accuracy']:.1f}% "
    return (head + f"{acc}FD ratio {row['fd_ratio']:.2f} {row['images_per_s']:.1f} img/s"
            + (" (from the results file)" if reused else ""))


def check_sweep_arguments(models, samplers, ladder, num: int):
    """The checks :func:`sweep` makes before any work (also for a caller that wants them earlier, the CLI): returns
    (models (default: :func:`diffusion_models`), samplers (None: each model's defaults) without repeats, the ladder
    without repeats, num). ValueError / TypeError naming the flag: an unknown model or a GAN, an unknown sampler, a
    step count < 1, num < 1."""
    from fastdiff.files import read_json_object
    from fastdiff.hub import SAMPLERS, model_path
    from fastdiff.validation import check_positive_int

    num = check_positive_int("--num", num)
    steps_ladder = _check_ladder(ladder)
    models = diffusion_models() if models is None else [str(m) for m in models]
    if not models:
        raise ValueError("--models: no diffusion model to sweep")
    for name in models:
        try:
            folder = model_path(name)
        except ValueError as exc:  # an unknown model
            raise ValueError(f"--models: {exc}") from None
        if read_json_object(folder / "model_index.json").get("scheduler") is None:
            raise ValueError(f"--models: {name!r} has no diffusion sampler to sweep (a GAN)")
    if samplers is not None:
        samplers = list(dict.fromkeys(samplers))
        bad = [s for s in samplers if s not in SAMPLERS]
        if bad or not samplers:
            raise ValueError(f"--samplers must be names of {sorted(SAMPLERS)}, got {bad or samplers!r}")
    return models, samplers, steps_ladder, num


def sweep(models: Optional[Sequence[str]] = None, samplers: Optional[Sequence[str]] = None,
          ladder: Sequence[int] = SWEEP_LADDER, num: int = 500, seed: int = 0, guidance: Optional[float] = None,
          dtype="auto", device=None, results=None, progress: bool = True,
          log: Optional[Callable[[str], None]] = print) -> list[dict]:
    """Quality and speed of every (model, sampler, step count): one row per combination.

    Args:
        models: model names or pipeline folders (default: :func:`diffusion_models`, every shipped diffusion model).
        samplers: names of :data:`fastdiff.hub.SAMPLERS` (default per model: :func:`default_samplers`; a default
            sampler whose optional dependency is missing, dpm++-sde without torchsde, is skipped with a note).
        ladder: the step counts, each ≥ 1.
        num, seed, guidance: as :func:`evaluate` samples (labels i mod 10, one generator seeded with ``seed``,
            batches of 250; guidance None: each model's default).
        dtype, device: as :func:`fastdiff.load` takes them (dtype "auto": bf16 on a CPU with native bf16).
        results: a JSON file ({"rows": [row, ...]}). Rows already there with the same :data:`SWEEP_KEY` (model,
            sampler, steps, num, seed, guidance, dtype, device) are reused, except error rows, which are tried again;
            after each new row the whole file is rewritten atomically (rows of other sweeps in it are kept). A file
            that is not valid JSON or not a results file is a ValueError naming it, and is left untouched.
        progress: tqdm bars within sampling.
        log: called with one line per row (and a note per skipped sampler); None: silent.

    Each (model, sampler) is loaded once (``fastdiff.load(model, sampler=...)``); each row makes one untimed
    warm-up call (min(10, num) images at that step count), then samples ``num`` images timing only the pipeline
    calls. The real digits' features are computed once per sweep (only if a row is computed).

    Returns the rows in sweep order (model, sampler, steps), dicts with the keys: model, sampler (short name),
    scheduler (class name), steps, unet_calls_per_image (UNet-evaluated images per sample, counted during the timed
    calls: steps × evaluations per step × 2 under classifier-free guidance), guidance, num, seed, dtype, device,
    accuracy (fraction; None for an unconditional model), fd, fd_real, fd_ratio, seconds, images_per_s,
    ms_per_image, torch, cpu, threads. A combination that raises ValueError (or NaN/Inf in the latents) is a row
    with "error" (the message) and no metrics, and the sweep goes on.

    Raises ValueError/TypeError naming the argument (as the command spells it) before any work: an unknown model,
    a model without a diffusion sampler (a GAN), an unknown sampler, a step count < 1, num < 1; FileNotFoundError
    when the results file's folder does not exist.
    """
    import fastdiff
    from fastdiff.files import write_json_atomic
    from fastdiff.hub import SAMPLERS, sampling_defaults

    say = log or (lambda line: None)
    models, samplers, steps_ladder, num = check_sweep_arguments(models, samplers, ladder, num)
    explicit = samplers is not None
    results = None if results is None else Path(results)
    if results is not None and not (results.parent if str(results.parent) else Path(".")).is_dir():
        raise FileNotFoundError(f"--results {str(results)!r}: folder {str(results.parent)!r} does not exist")
    stored = _read_results(results) if results is not None else []
    done = {_key(r): r for r in stored if "error" not in r and all(k in r for k in SWEEP_ROW_KEYS)}

    environment = {"torch": torch.__version__, "cpu": cpu_model(), "threads": torch.get_num_threads()}
    scorer: dict = {}  # the classifier and the real digits' features, made at the first computed row

    def record(row: dict) -> None:
        """Add a new row to the results (and the file): it replaces a stored row with its key, and the stored error
        rows of its (model, sampler, steps, num, seed) (an earlier failed try, tried again)."""
        rows.append(row)
        attempt = tuple(row[k] for k in ("model", "sampler", "steps", "num", "seed"))
        stored[:] = [old for old in stored if _key(old) != _key(row) and not (
            "error" in old and tuple(old.get(k) for k in ("model", "sampler", "steps", "num", "seed")) == attempt)]
        stored.append(row)
        if results is not None:
            write_json_atomic(results, {"rows": stored})
        say(_row_line(row))

    rows: list[dict] = []
    for model in models:
        names = samplers if explicit else default_samplers(fastdiff.load(model, dtype=dtype, device=device))
        for sampler in names:
            try:
                pipe, load_error = fastdiff.load(model, sampler=sampler, dtype=dtype, device=device), None
            except ImportError as exc:  # an optional dependency (torchsde for dpm++-sde)
                if not explicit:
                    say(f"{model} {sampler}: skipped ({exc})")
                    continue
                pipe, load_error = None, str(exc)
            setting = {"guidance": guidance, "num": num, "seed": seed,
                       "dtype": str(dtype) if pipe is None else _dtype_name(pipe),
                       "device": str(torch.device(device or "cpu")) if pipe is None else str(pipe.device)}
            for steps in steps_ladder:
                row = {"model": model, "sampler": sampler, "scheduler": SAMPLERS[sampler], "steps": steps}
                resolved = guidance  # the model's default guidance once sampling_defaults has said it
                try:
                    if load_error is not None:
                        raise ValueError(load_error)
                    defaults = sampling_defaults(pipe, steps=steps, guidance=guidance, model=model)
                    resolved = defaults.guidance
                    key = _key({**row, **setting, "guidance": resolved})
                    if key in done:
                        rows.append(done[key])
                        say(_row_line(done[key], reused=True))
                        continue
                    sample_images(pipe, defaults, min(WARMUP_IMAGES, num), seed=seed, progress=False)  # warm-up
                    with count_unet_rows(pipe.unet) as unet_rows:
                        images, labels, seconds = sample_images(pipe, defaults, num, seed=seed, progress=progress)
                except (ValueError, FloatingPointError) as exc:  # FloatingPointError: NaN/Inf in the latents
                    record({**row, **setting, "guidance": resolved, "error": str(exc), **environment})
                    continue
                if not scorer:
                    scorer["classifier"] = load_classifier()
                    scorer["real"] = real_digits(scorer["classifier"])
                scores = score_images(scorer["classifier"], images, labels, scorer["real"])
                record({**row, "unet_calls_per_image": unet_rows[0] / num, **setting, "guidance": resolved,
                        "accuracy": scores.get("accuracy"), "fd": scores["fd"], "fd_real": scores["fd_real"],
                        "fd_ratio": scores["fd_ratio"], "seconds": seconds, "images_per_s": num / seconds,
                        "ms_per_image": 1000 * seconds / num, **environment})
            del pipe
    return rows


# --------------------------------------------------------------------------------------------- sweep summaries
def _sorted_rows(rows: Sequence[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (str(r.get("model")), str(r.get("sampler")), int(r.get("steps") or 0)))


def _shorten(text: str, width: int = 80) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[:width - 1] + "…"


def _calls(value) -> str:
    return f"{value:g}" if float(value).is_integer() else f"{value:.2f}"


def format_sweep(rows: Sequence[dict]) -> str:
    """A Markdown table of sweep rows (model | sampler | steps | UNet calls/image | correct digit | FD ratio |
    images/s), sorted by model, sampler and steps; an error row has "—" for its numbers and the reason, shortened,
    in its last column."""
    lines = ["| model | sampler | steps | UNet calls/image | correct digit | FD ratio | images/s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in _sorted_rows(rows):
        head = f"| {r['model']} | {r['sampler']} | {r['steps']} "
        if "error" in r:
            lines.append(head + f"| — | — | — | — ({_shorten(r['error'])}) |")
            continue
        acc = "n/a" if r.get("accuracy") is None else f"{100 * r['accuracy']:.1f}%"
        lines.append(head + f"| {_calls(r['unet_calls_per_image'])} | {acc} | {r['fd_ratio']:.2f} "
                     f"| {r['images_per_s']:.1f} |")
    return "\n".join(lines)


def _sweep_title(rows: Sequence[dict]) -> str:
    def values(key):
        return ", ".join(str(v) for v in dict.fromkeys(r.get(key) for r in rows if r.get(key) is not None))

    return (f"quality vs speed: {values('cpu') or 'unknown CPU'}, torch {values('torch')}, "
            f"threads {values('threads')}, {values('dtype')}, {values('num')} samples per point")


def plot_sweep(rows: Sequence[dict], path, panels: Optional[dict] = None) -> Path:
    """A PNG chart of sweep rows at ``path`` (written atomically): one column per panel (by default one per model);
    top row FD ratio, bottom row correct-digit % (0–100), both against ms per image (log scales), one line per
    sampler (step counts written next to the points of one line per panel: ddim, else lcm, else the first), a
    dashed line at the real-vs-real level (FD ratio 1). ``panels`` maps a model to the model whose panel it joins
    (e.g. {"digits-lcm": "digits-ddpm"}: a distilled model next to its teacher's samplers), its lines labelled
    "model (sampler)" and drawn bold. Error rows are left out. Needs matplotlib (the ``bench`` extra): ImportError
    naming it. Returns the path."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        raise ImportError("plot_sweep needs matplotlib: pip install 'fastdiff[bench]' (or matplotlib)") from None
    from fastdiff.files import write_atomic

    good = [r for r in rows if "error" not in r and r.get("fd_ratio") is not None and r.get("ms_per_image")]
    if not good:
        raise ValueError("plot_sweep: no rows with measurements to plot")
    panels = dict(panels or {})
    present = set(r["model"] for r in good)

    def panel_of(model):
        return panels.get(model, model) if panels.get(model) in present else model

    def series_of(r):
        return r["sampler"] if panel_of(r["model"]) == r["model"] else f"{r['model']} ({r['sampler']})"

    columns = sorted(dict.fromkeys(panel_of(r["model"]) for r in good))
    own_names = sorted(dict.fromkeys(series_of(r) for r in good if panel_of(r["model"]) == r["model"]))
    guest_names = sorted(dict.fromkeys(series_of(r) for r in good if panel_of(r["model"]) != r["model"]))
    cmap = matplotlib.colormaps["tab20"]
    colors = {s: cmap(i % 20) for i, s in enumerate(own_names)}
    colors.update({s: c for s, c in zip(guest_names, ["black", "crimson", "navy", "darkgreen", "purple"] * 4)})
    markers = "os^vD<>pPX*hH8d"
    series_names = own_names + guest_names
    has_accuracy = any(r.get("accuracy") is not None for r in good)
    nrows = 2 if has_accuracy else 1
    fig = Figure(figsize=(3.6 * len(columns) + 1.8, 3.1 * nrows + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, len(columns), squeeze=False)
    for col, column in enumerate(columns):
        mine = [r for r in good if panel_of(r["model"]) == column]
        own = list(dict.fromkeys(sorted(series_of(r) for r in mine)))
        labelled = next((s for s in ("ddim", "lcm") if s in own), own[0])
        for row_i, (key, label) in enumerate([("fd_ratio", "FD ratio (vs real-vs-real)"),
                                              ("accuracy", "correct digit %")][:nrows]):
            ax = axes[row_i][col]
            for series in own:
                pts = sorted((r for r in mine if series_of(r) == series and r.get(key) is not None),
                             key=lambda r: r["steps"])
                if not pts:
                    continue
                xs = [r["ms_per_image"] for r in pts]
                ys = [r[key] * (100 if key == "accuracy" else 1) for r in pts]
                guest = series in guest_names
                ax.plot(xs, ys, marker=markers[series_names.index(series) % len(markers)], markersize=3.5,
                        linewidth=2.2 if guest else 1.6 if series == labelled else 1.0, color=colors[series],
                        label=series)
                if series == labelled or guest:
                    for x, y, r in zip(xs, ys, pts):
                        ax.annotate(str(r["steps"]), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6,
                                    color=colors[series])
            ax.set_xscale("log")
            axes_to_label = [ax.xaxis]
            if key == "fd_ratio":
                ax.set_yscale("log")
                axes_to_label.append(ax.yaxis)
            else:
                ax.set_ylim(-2, 102)
            for axis in axes_to_label:  # plain numbers at 1, 2, 5 × 10^k (no "2×10^1" minor labels)
                axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                axis.set_minor_formatter(NullFormatter())
            if key == "fd_ratio":
                ax.axhline(1.0, color="0.3", linestyle="--", linewidth=0.9, label="real vs real")
                guests = sorted({r["model"] for r in mine} - {column})
                ax.set_title(column + (f" (+ {', '.join(guests)})" if guests else ""), fontsize=9)
            ax.set_xlabel("ms per image", fontsize=8)
            if col == 0:
                ax.set_ylabel(label, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(True, which="both", linewidth=0.3, alpha=0.5)
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles.keys()), loc="center right", fontsize=7, frameon=False)
    fig.suptitle(_sweep_title(good) + "\n(step counts next to the points of ddim/lcm and of bold lines)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1 - 1.6 / fig.get_figwidth(), 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    # a 256-colour palette keeps the file small (a few hundred KB as RGBA for four models × 17 samplers)
    from PIL import Image

    buffer.seek(0)
    image = Image.open(buffer).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return write_atomic(Path(path), out.getvalue())


def headline(rows: Sequence[dict], lcm_model: str = "digits-lcm", base_model: str = "digits-ddpm",
             lcm_steps: int = 4, base_steps: int = 25) -> Optional[dict]:
    """The LCM speed-up in numbers, from sweep rows: ``lcm_model`` with the lcm sampler at ``lcm_steps`` against
    ``base_model`` with ddim (a) at the fewest steps whose quality reaches it (accuracy ≥ the LCM row's − 0.005 and
    FD ratio ≤ the LCM row's; if no step count does, the ddim row with the lowest FD ratio, and "reached" False)
    and (b) at ``base_steps`` steps with the model's default guidance.

    Returns None unless the LCM row and the ddim row at ``base_steps`` are there (without errors); else {"lcm":
    row, "same_quality": row, "reached": bool, "default": row, "speedup_same_quality": images/s ratio,
    "speedup_default": images/s ratio} (rows as sweep() makes them)."""
    from fastdiff.hub import list_models, model_settings

    ok = [r for r in rows if "error" not in r and r.get("images_per_s")]
    lcm = next((r for r in ok if r["model"] == lcm_model and r["sampler"] == "lcm" and r["steps"] == lcm_steps),
               None)
    ddim = [r for r in ok if r["model"] == base_model and r["sampler"] == "ddim"]
    default_guidance = (model_settings(base_model).get("default_guidance_scale")
                        if base_model in list_models() else None)
    if default_guidance is not None and any(r.get("guidance") == default_guidance for r in ddim):
        ddim = [r for r in ddim if r.get("guidance") == default_guidance]
    default = next((r for r in ddim if r["steps"] == base_steps), None)
    if lcm is None or default is None:
        return None

    def reaches(r):
        acc_ok = lcm.get("accuracy") is None or (r.get("accuracy") is not None
                                                 and r["accuracy"] >= lcm["accuracy"] - 0.005)
        return acc_ok and r["fd_ratio"] <= lcm["fd_ratio"]

    matching = sorted((r for r in ddim if reaches(r)), key=lambda r: r["steps"])
    same = matching[0] if matching else min(ddim, key=lambda r: (r["fd_ratio"], -(r.get("accuracy") or 0)))
    return {"lcm": lcm, "same_quality": same, "reached": bool(matching), "default": default,
            "speedup_same_quality": lcm["images_per_s"] / same["images_per_s"],
            "speedup_default": lcm["images_per_s"] / default["images_per_s"]}


def format_headline(h: dict) -> str:
    """The :func:`headline` numbers as three lines of text."""
    def quality(r):
        acc = "" if r.get("accuracy") is None else f"{100 * r['accuracy']:.1f}% correct digit, "
        return f"{acc}FD ratio {r['fd_ratio']:.2f}"

    lcm, same, default = h["lcm"], h["same_quality"], h["default"]
    lines = [f"{lcm['model']} lcm, {lcm['steps']} steps: {lcm['images_per_s']:.1f} images/s ({quality(lcm)})"]
    if h["reached"]:
        lines.append(f"  vs {same['model']} ddim at the same quality ({same['steps']} steps, {quality(same)}): "
                     f"{same['images_per_s']:.1f} images/s → {h['speedup_same_quality']:.1f}× faster")
    else:
        lines.append(f"  no ddim step count of the ladder reaches that quality; the best ddim row ({same['steps']} "
                     f"steps, {quality(same)}): {same['images_per_s']:.1f} images/s → "
                     f"{h['speedup_same_quality']:.1f}× faster")
    guidance = "" if default.get("guidance") is None else f", guidance {default['guidance']:g}"
    lines.append(f"  vs {default['model']} ddim {default['steps']} steps{guidance} ({quality(default)}): "
                 f"{default['images_per_s']:.1f} images/s → {h['speedup_default']:.1f}× faster")
    return "\n".join(lines)
