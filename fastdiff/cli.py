"""The ``fastdiff`` command: sample, models, info, eval, bench, train, generate.

Errors (unknown model or sampler, unwritable output, bad numbers, a class for an unconditional model) print one
line to stderr and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

class UsageError(Exception):
    """A bad argument: reported as one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as for every other usage error
        raise UsageError(message)


# --------------------------------------------------------------------------------------------- shared helpers
def _positive(name: str, value: Optional[int]) -> Optional[int]:
    """An optional integer option that must be ≥ 1 (ValueError naming it: exit code 2)."""
    from fastdiff.validation import check_positive_int

    return None if value is None else check_positive_int(name, value)


def check_writable_file(path: str, flag: str = "--out", example: str = "samples.png") -> Path:
    """The output file's folder must exist and be writable (checked before any work); errors name ``flag``."""
    out = Path(path)
    folder = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise UsageError(f"{flag} {path!r} is a directory; give a file name such as {example}")
    if not folder.is_dir():
        raise UsageError(f"{flag} {path!r}: folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise UsageError(f"{flag} {path!r} is not writable")
    return out


# --------------------------------------------------------------------------------------------- sample
def cmd_sample(args) -> int:
    """``fastdiff sample``: ``--num`` images in one PNG grid. Class-conditional models (and text-to-image models,
    whose labels are the prompts "0" … "9") get labels cycling 0 … 9, or ``--class`` for all; a text-to-image model
    takes ``--prompt`` (every image) and ``--negative-prompt`` (under guidance > 1) instead, one with a ControlNet
    ``--control MAP.png`` (the control map of every image) and ``--control-scale``, and ``--image-prompt DIGIT.png``
    (the image prompt of every image, through the model's IP-Adapter or the one ``--ip-adapter`` names; the text
    prompt is then "" unless ``--prompt`` is given) and ``--ip-adapter-scale``."""
    import torch

    import fastdiff
    from fastdiff.pipelines import TextToImagePipeline, save_grid

    _positive("--steps", args.steps)
    _positive("--num", args.num)
    if args.seed < 0:
        raise UsageError(f"--seed must be ≥ 0, got {args.seed}")
    if args.prompt is not None and args.class_label is not None:
        raise UsageError("give --prompt or --class, not both (--class d is the prompt \"d\")")
    if args.control_scale is not None and args.control is None:
        raise UsageError("--control-scale needs --control (a control map PNG)")
    if args.control_scale is not None and not math.isfinite(args.control_scale):
        raise UsageError(f"--control-scale must be a finite number, got {args.control_scale}")
    if args.ip_adapter_scale is not None and args.image_prompt is None:
        raise UsageError("--ip-adapter-scale needs --image-prompt (an image prompt PNG)")
    if args.ip_adapter_scale is not None and not math.isfinite(args.ip_adapter_scale):
        raise UsageError(f"--ip-adapter-scale must be a finite number, got {args.ip_adapter_scale}")
    if args.image_prompt is not None and args.class_label is not None:
        raise UsageError("give --image-prompt or --class, not both (the image prompt sets the digit)")
    if args.truncation is not None and not math.isfinite(args.truncation):
        raise UsageError(f"--truncation must be a finite number, got {args.truncation}")
    out = check_writable_file(args.out)
    control = None if args.control is None else _read_image("--control", args.control, "a control map PNG, e.g. an "
                                                            "edge map")
    image_prompt = None if args.image_prompt is None else _read_image("--image-prompt", args.image_prompt,
                                                                      "an image prompt PNG, e.g. a digit")
    device = fastdiff.hub.resolve_device(args.device)
    if args.backend:
        os.environ["FASTDIFF_BACKEND"] = args.backend
    pipe = fastdiff.load(args.model, sampler=args.sampler, device=device, dtype=args.dtype)
    text = isinstance(pipe, TextToImagePipeline)
    for flag, value in (("--prompt", args.prompt), ("--negative-prompt", args.negative_prompt),
                        ("--control", args.control), ("--image-prompt", args.image_prompt)):
        if value is not None and not text:
            raise UsageError(f"{flag}: model {args.model!r} is a {type(pipe).__name__}, not a text-to-image model "
                             f"(TextToImagePipeline)")
    if control is not None and getattr(pipe, "controlnet", None) is None:
        raise UsageError(f"--control: model {args.model!r} has no ControlNet (e.g. --model digits-controlnet)")
    if args.truncation is not None and not hasattr(getattr(pipe, "generator", None), "w_avg"):
        raise UsageError(f"--truncation: model {args.model!r} has no mapping network (e.g. --model digits-stylegan)")
    if image_prompt is not None and getattr(pipe, "ip_adapter", None) is None:
        try:
            pipe.load_ip_adapter(args.ip_adapter)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"--image-prompt: model {args.model!r} has no IP-Adapter and --ip-adapter "
                             f"{args.ip_adapter!r} does not fit it: {exc}") from None
    defaults = fastdiff.hub.sampling_defaults(pipe, steps=args.steps, guidance=args.guidance, model=args.model)
    if args.negative_prompt is not None and (defaults.guidance is None or defaults.guidance <= 1):
        raise UsageError(f"--negative-prompt needs classifier-free guidance > 1 (--guidance), got "
                         f"{defaults.guidance if defaults.guidance is not None else 'none'}")
    labels = defaults.class_labels(range(args.num))
    if args.class_label is not None:
        if labels is None:
            raise UsageError(f"--class: model {args.model!r} is unconditional")
        if not 0 <= args.class_label < defaults.num_classes:
            raise UsageError(f"--class must be in [0, {defaults.num_classes}), got {args.class_label}")
        labels = [args.class_label] * args.num
    kwargs = {"generator": torch.Generator("cpu").manual_seed(args.seed), "output_type": "pil",
              "progress": not args.quiet, **defaults.call_kwargs()}
    if args.prompt is not None or image_prompt is not None:  # one prompt for every image ("" with an image prompt)
        kwargs.update(prompt=args.prompt or "", num_images_per_prompt=args.num)
    else:  # class labels (a text model reads label d as the prompt "d"), or an unconditional model
        kwargs["batch_size"] = args.num
        if labels is not None:
            kwargs["class_labels"] = labels
    if args.negative_prompt is not None:
        kwargs["negative_prompt"] = args.negative_prompt
    if control is not None:  # one map for every image
        kwargs.update(image=control, controlnet_conditioning_scale=args.control_scale)
    if image_prompt is not None:  # one image prompt for every image
        kwargs.update(ip_adapter_image=image_prompt, ip_adapter_scale=args.ip_adapter_scale)
    if args.truncation is not None:
        kwargs["truncation"] = args.truncation
    images = pipe(**kwargs)
    settings = pipe.settings
    save_grid(images, out, nrow=int(settings.get("grid_columns", 0)) or None, scale=int(settings.get("grid_scale", 1)))
    what = f"prompt {args.prompt!r}, " if args.prompt is not None else ""
    if control is not None:
        what += f"control {args.control}, "
    if image_prompt is not None:
        what += f"image prompt {args.image_prompt}, "
    if args.truncation is not None:
        what += f"truncation ψ = {args.truncation}, "
    print(f"wrote {out} ({len(images)} images, {what}model {args.model}, seed {args.seed})")
    return 0


def _read_image(flag: str, path: str, what: str):
    """``--control`` / ``--image-prompt``: the PNG (any image PIL reads) as a PIL image in L or RGB, read before the
    model loads."""
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise UsageError(f"{flag} {path!r}: no such file (give {what})")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("1", "LA"):
                return im.convert("L")
            if mode in ("P", "RGBA"):
                return im.convert("RGB")
            if mode in ("L", "RGB"):
                return im.copy()
    except (UnidentifiedImageError, OSError) as exc:
        raise UsageError(f"{flag} {path!r}: not a readable image ({exc})") from None
    raise UsageError(f"{flag} {path!r}: image mode {mode!r} is not supported (save it as 8-bit grayscale or RGB)")


# --------------------------------------------------------------------------------------------- models / info
def cmd_models(args) -> int:
    import fastdiff

    for name in fastdiff.list_models():
        settings = fastdiff.hub.model_settings(name)
        print(f"{name:16s} {settings.get('description', '')}")
    return 0


def cmd_info(args) -> int:
    import fastdiff

    if args.verify:
        return _verify_assets(args.json)
    info = fastdiff.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"fastdiff {fastdiff.__version__}  torch {info['torch']}  triton {info['triton'] or 'not installed'}  "
          f"device {info['device']}")
    print(f"TRITON_INTERPRET={int(info['triton_interpret'])}  FASTDIFF_BACKEND={info['backend_env']}  "
          f"native extension: {info['native_extension']}")
    for op, path in info["ops"].items():
        print(f"  {op:16s} -> {path}")
    print(f"batch_invariant() GEMM: {info['batch_invariant_gemm']}")
    native_bf16 = "yes" if info["cpu_native_bf16"] else "no"
    print(f"--dtype auto here: {info['dtype_auto']} (CPU with native bf16: {native_bf16})")
    return 0


def _verify_assets(as_json: bool) -> int:
    """``fastdiff info --verify``: every shipped folder's weight files against its checksums.json; exit 1 if any
    differs (each damaged folder printed with the file and digests), else 0."""
    from fastdiff.integrity import verify_assets

    report = verify_assets()
    bad = {name: r for name, r in report.items() if isinstance(r, str)}
    if as_json:
        print(json.dumps({"ok": not bad, "assets": report}, indent=2))
    else:
        for name, result in report.items():
            print(f"  {name:20s} " + (f"DAMAGED: {result}" if isinstance(result, str)
                                       else f"ok ({len(result)} weight file{'s' if len(result) != 1 else ''}, sha256)"))
        print(f"{len(report) - len(bad)} of {len(report)} shipped folders verified"
              + ("" if not bad else f"; damaged: {', '.join(bad)} (reinstall fastdiff)"))
    return 1 if bad else 0


# --------------------------------------------------------------------------------------------- eval / bench / train
def _names(flag: str, text: Optional[str]) -> Optional[list[str]]:
    """A comma-separated list option ("a,b"): its names in order, without repeats; None when not given."""
    if text is None:
        return None
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise UsageError(f"{flag} needs at least one value (comma-separated), got {text!r}")
    return names


def _ladder(text: Optional[str]) -> Optional[list[int]]:
    """``--ladder 1,2,4``: the step counts as integers (:func:`fastdiff.evaluation.sweep` checks they are ≥ 1)."""
    if text is None:
        return None
    try:
        return [int(item) for item in _names("--ladder", text)]
    except ValueError:
        raise UsageError(f"--ladder takes positive integers separated by commas (e.g. 1,2,4,8), got {text!r}") from None


SWEEP_OPTIONS = ("models", "samplers", "ladder", "results", "chart", "table")


def cmd_eval_sweep(args) -> int:
    """``fastdiff eval --sweep``: :func:`fastdiff.evaluation.sweep`, then its table, chart and headline."""
    from fastdiff import evaluation, hub

    instead = {"--steps": "--ladder", "--sampler": "--samplers", "--card": "fastdiff eval MODEL --card"}
    for flag, value in (("--steps", args.steps), ("--sampler", args.sampler), ("--card", args.card or None)):
        if value is not None:
            raise UsageError(f"{flag} is for one model's evaluation; with --sweep use {instead[flag]}")
    if args.model is not None and args.models is not None:
        raise UsageError("give the model either as MODEL or with --models, not both")
    models = [args.model] if args.model is not None else _names("--models", args.models)
    models, samplers, ladder, _ = evaluation.check_sweep_arguments(  # ValueError naming the flag → exit 2
        models, _names("--samplers", args.samplers), _ladder(args.ladder) or evaluation.SWEEP_LADDER, args.num)
    results = check_writable_file(args.results or "sweep.json", "--results", "sweep.json")
    chart = None
    try:  # the chart needs matplotlib: checked before the sweep; without it the default chart is skipped
        import matplotlib  # noqa: F401
    except ImportError:
        if args.chart is not None:
            raise ImportError("--chart needs matplotlib: pip install 'fastdiff[bench]'") from None
        print("note: no chart (matplotlib is not installed: pip install 'fastdiff[bench]')", file=sys.stderr)
    else:
        chart = check_writable_file(args.chart or "quality_vs_speed.png", "--chart", "quality_vs_speed.png")
    table = None if args.table is None else check_writable_file(args.table, "--table", "sweep.md")
    rows = evaluation.sweep(models=models, samplers=samplers, ladder=ladder, num=args.num, seed=args.seed,
                            guidance=args.guidance, dtype=args.dtype, device=hub.resolve_device(args.device),
                            results=results, progress=not args.quiet)
    text = evaluation.format_sweep(rows)
    print(text)
    if results.exists():
        print(f"results: {results}")
    if table is not None:
        from fastdiff.files import write_text_atomic

        write_text_atomic(table, text + "\n")
        print(f"wrote {table}")
    if chart is not None and any("error" not in r for r in rows):
        print(f"wrote {evaluation.plot_sweep(rows, chart)}")
    head = evaluation.headline(rows)
    if head is not None:
        print(evaluation.format_headline(head))
    return 0


def cmd_eval(args) -> int:
    from fastdiff import evaluation

    import fastdiff

    if args.sweep:
        return cmd_eval_sweep(args)
    given = [f"--{name}" for name in SWEEP_OPTIONS if getattr(args, name) is not None]
    if given:
        raise UsageError(f"{given[0]} needs --sweep")
    if args.model is None:
        raise UsageError("eval: give a MODEL (fastdiff models lists them), or --sweep")
    _positive("--num", args.num)
    if args.steps is not None:
        _positive("--steps", args.steps)
    pipe = fastdiff.load(args.model, sampler=args.sampler, device=fastdiff.hub.resolve_device(args.device),
                         dtype=args.dtype)
    if getattr(pipe, "ip_adapter", None) is not None:  # an IP-Adapter: does the sample follow the image prompt
        report = evaluation.evaluate_image_prompts(pipe, num=args.num, steps=args.steps, guidance=args.guidance,
                                                   seed=args.seed, progress=not args.quiet)
        print(evaluation.format_image_prompt_report(args.model, report))
    elif getattr(pipe, "controlnet", None) is not None:  # a ControlNet: does the sample follow the control map
        report = evaluation.evaluate_control(pipe, num=args.num, steps=args.steps, guidance=args.guidance,
                                             seed=args.seed, progress=not args.quiet)
        print(evaluation.format_control_report(args.model, report))
    elif getattr(pipe, "tokenizer", None) is not None:  # text-to-image: prompt adherence (digits, attributes)
        report = evaluation.evaluate_prompts(pipe, num=args.num, steps=args.steps, guidance=args.guidance,
                                             seed=args.seed, progress=not args.quiet)
        print(evaluation.format_prompt_report(args.model, report))
    else:
        report = evaluation.evaluate(pipe, num=args.num, steps=args.steps, guidance=args.guidance, seed=args.seed,
                                     progress=not args.quiet, model=args.model)
        print(evaluation.format_report(args.model, report))
    if args.card:
        from fastdiff import training

        print(f"wrote {training.write_model_card(fastdiff.hub.model_path(args.model), report)}")
    return 0


def cmd_bench(args) -> int:
    from fastdiff import bench
    from fastdiff.hub import resolve_device

    repeats = _positive("--repeats", args.repeats)
    device = resolve_device(args.device)
    print(bench.quick_table(device, repeats=repeats, compile_backend="inductor" if args.compile else None))
    return 0


def cmd_train(args) -> int:
    from fastdiff import training

    if args.name not in training.RECIPES:
        raise UsageError(f"unknown model {args.name!r} to train; known: {', '.join(sorted(training.RECIPES))}")
    _positive("--steps", args.steps)
    if args.loss is not None and "loss" not in training.RECIPES[args.name].options:
        raise UsageError(f"--loss: recipe {args.name!r} is not a GAN recipe ({', '.join(training.gan_recipes())})")
    out = Path(args.out) if args.out else Path(f"./{args.name}")
    metrics = training.train(args.name, out, steps=args.steps, seed=args.seed, progress=not args.quiet,
                             loss=args.loss)
    print(f"{args.name}: trained in {metrics['train_seconds']} s → {out}")
    return 0


def cmd_generate(args) -> int:
    """``fastdiff generate``: :func:`fastdiff.generate.generate` in this process (or in each torchrun worker), or in
    ``--nproc`` local workers started through PyTorch's elastic launcher; rank 0's summary is printed."""
    from fastdiff.generate import check_arguments, distributed, format_summary, generate, job

    kwargs = {"model": args.model, "num": args.num, "outdir": args.outdir, "batch": args.batch, "sampler": args.sampler,
              "steps": args.steps, "seed": args.seed, "guidance": args.guidance, "fmt": args.format,
              "device": args.device, "progress": not args.quiet, "batch_invariant": args.batch_invariant}
    if args.nproc is None:
        summary = generate(**kwargs)
        if summary["rank"] == 0:
            print(format_summary(summary), flush=True)
        return _generate_exit_code(summary)
    _positive("--nproc", args.nproc)
    if os.environ.get("WORLD_SIZE") not in (None, "", "1"):
        raise UsageError("--nproc starts its own workers: do not combine it with torchrun")
    check_arguments(**{k: v for k, v in kwargs.items() if k not in ("device", "progress")})  # before any worker
    results = distributed.launch(args.nproc, job.worker, kwargs)
    errors = sorted({r["error"] for r in results.values() if "error" in r})
    if errors:
        raise ValueError(errors[0])
    print(format_summary(results[0]), flush=True)
    return _generate_exit_code(results[0])


def _generate_exit_code(summary: dict) -> int:
    """128 + the signal that stopped the job early (143 for SIGTERM, 130 for SIGINT, the shells' convention), 1 if
    images failed with NaN/Inf, else 0."""
    import signal

    if summary.get("stopped_by"):
        return 128 + int(getattr(signal, summary["stopped_by"]))
    return 1 if summary.get("failed") else 0


# --------------------------------------------------------------------------------------------- parser
DTYPE_HELP = "compute dtype (default auto: bf16 on a CPU with native bf16, else the weights' fp32)"


def build_parser() -> argparse.ArgumentParser:
    from fastdiff.hub import DTYPE_CHOICES, SAMPLERS
    from fastdiff.training import GAN_LOSSES, gan_recipes

    p = _Parser(prog="fastdiff", description="Fast samplers for image-generation models.")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    s = sub.add_parser("sample", help="sample a model and write a PNG grid (--prompt for a text-to-image model)")
    s.add_argument("--model", default="digits-ddpm", help="a shipped model (fastdiff models) or a pipeline folder")
    s.add_argument("--sampler", choices=sorted(SAMPLERS), default=None, help="default: the model's own")
    s.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's, e.g. 25)")
    s.add_argument("--num", type=int, default=16, help="images to make")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (class or text models; default: the model's)")
    s.add_argument("--class", dest="class_label", type=int, default=None,
                   help="the digit to draw (0-9) for every image (default: 0-9 cycling); a text model draws the "
                        "prompt \"D\"")
    s.add_argument("--prompt", default=None, metavar="TEXT",
                   help="text-to-image models: the prompt of every image (e.g. \"a thin slanted 4\")")
    s.add_argument("--negative-prompt", default=None, metavar="TEXT",
                   help="text-to-image models: what guidance steers away from (needs guidance > 1)")
    s.add_argument("--control", default=None, metavar="PNG",
                   help="models with a ControlNet: the control map of every image (e.g. an edge map; resized to the "
                        "size the ControlNet takes, RGB made gray for a 1-channel ControlNet)")
    s.add_argument("--control-scale", type=float, default=None, metavar="S",
                   help="with --control: the ControlNet's conditioning scale (default: the model's, else 1.0)")
    s.add_argument("--image-prompt", default=None, metavar="PNG",
                   help="text-to-image models: the image prompt of every image (e.g. a digit; resized to the image "
                        "encoder's size, RGB made gray), through the model's IP-Adapter or --ip-adapter's; the text "
                        "prompt is \"\" unless --prompt is given")
    s.add_argument("--ip-adapter", default="digits-ip-adapter", metavar="NAME",
                   help="with --image-prompt, for a model without an IP-Adapter: the IP-Adapter to load (a shipped "
                        "name or folder; default: digits-ip-adapter, made for digits-sd)")
    s.add_argument("--ip-adapter-scale", type=float, default=None, metavar="S",
                   help="with --image-prompt: the IP-Adapter's scale (default: the model's, else 1.0; 0: no effect)")
    s.add_argument("--truncation", type=float, default=None, metavar="PSI",
                   help="StyleGAN models: the truncation trick, w = w_avg + PSI·(w − w_avg) (1: off, the default; "
                        "0.7: typical images, less variety)")
    s.add_argument("--out", default="samples.png")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    s.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help=DTYPE_HELP)
    s.add_argument("--backend", choices=["auto", "torch", "triton", "native"], default=None,
                   help="kernel path (fastdiff info)")
    s.set_defaults(func=cmd_sample)

    m = sub.add_parser("models", help="list the shipped models")
    m.set_defaults(func=cmd_models)

    i = sub.add_parser("info", help="which implementation each op runs here")
    i.add_argument("--json", action="store_true")
    i.add_argument("--verify", action="store_true",
                   help="check every shipped model's weight files against the sha256 recorded with it (exit 1 if any "
                        "is damaged)")
    i.set_defaults(func=cmd_info)

    e = sub.add_parser("eval", help="score a model's samples with the shipped digit classifier (a text-to-image "
                                    "model: prompt adherence too; --sweep: every sampler over a ladder of step "
                                    "counts, quality vs speed)")
    e.add_argument("model", nargs="?", default=None, help="a shipped model or a pipeline folder (with --sweep: "
                                                          "sweep this model only)")
    e.add_argument("--num", type=int, default=500, help="samples to score (a text-to-image model: digit prompts; "
                                                         "+ 200 per attribute prompt and 600 for negative prompts)")
    e.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's, e.g. 25)")
    e.add_argument("--guidance", type=float, default=None)
    e.add_argument("--sampler", choices=sorted(SAMPLERS), default=None)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default=None)
    e.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help=DTYPE_HELP)
    e.add_argument("--card", action="store_true", help="write the scores into the model folder's MODEL_CARD.md")
    e.add_argument("--sweep", action="store_true",
                   help="quality vs speed of every sampler of every shipped diffusion model over --ladder")
    e.add_argument("--models", default=None, help="with --sweep: models to sweep, a,b (default: every diffusion model)")
    e.add_argument("--samplers", default=None,
                   help="with --sweep: samplers, x,y (default: all but lcm; lcm only for a guidance-distilled model)")
    e.add_argument("--ladder", default=None, help="with --sweep: step counts (default 1,2,4,8,15,25,50)")
    e.add_argument("--results", default=None,
                   help="with --sweep: JSON results file, resumed from if present (default sweep.json)")
    e.add_argument("--chart", default=None, help="with --sweep: PNG chart (default quality_vs_speed.png)")
    e.add_argument("--table", default=None, help="with --sweep: also write the Markdown table to this file")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="quick side-by-side speed table (reference vs fused, diffusers if installed)")
    b.add_argument("--device", default=None)
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--compile", action="store_true",
                   help="add a torch.compile column (inductor; its compile time is printed apart, tens of seconds)")
    b.set_defaults(func=cmd_bench)

    t = sub.add_parser("train", help="train a shipped model from scratch (needs scikit-learn)")
    t.add_argument("name")
    t.add_argument("--out", default=None, help="output pipeline folder (default ./NAME)")
    t.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--loss", choices=GAN_LOSSES, default=None,
                   help=f"GAN recipes ({', '.join(gan_recipes())}): the adversarial loss (default: the recipe's)")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="sample many images into a folder, sharded over torch.distributed ranks")
    g.add_argument("--model", default="digits-ddpm")
    # --num-images / -n: flags torchrun's parser cannot mistake (it reads --num as its --numa-binding)
    g.add_argument("-n", "--num-images", "--num", dest="num", type=int, required=True, help="how many images")
    g.add_argument("--outdir", required=True)
    g.add_argument("--batch", type=int, default=256)
    g.add_argument("--sampler", choices=sorted(SAMPLERS), default=None)
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--guidance", type=float, default=None)
    g.add_argument("--format", choices=["png", "npz"], default="png")
    g.add_argument("--device", default=None)
    g.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=None,
                   help="files independent of --batch, bit for bit (default: on for the CPU, off for CUDA)")
    g.add_argument("--nproc", type=int, default=None,
                   help="start N local worker processes (PyTorch's elastic launcher; no torchrun needed)")
    g.set_defaults(func=cmd_generate)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `torchrun ... -m fastdiff -- generate --num N`, the older spelling (torchrun would read
        argv = argv[1:]      # --num as its --numa-binding without the "--"); --num-images / -n need no "--"
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"fastdiff: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError) as exc:  # library validation: the message names the argument
        print(f"fastdiff: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:  # an optional dependency the chosen option needs (the message names the package)
        print(f"fastdiff: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # NonFiniteError: NaN/Inf while sampling (the message names the step)
        print(f"fastdiff: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the system refused (a full disk while writing images): the message says what to do
        print(f"fastdiff: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fastdiff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
