"""The `fastdiff` command, run as a subprocess the way users run it: outputs, determinism, and error paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fastdiff

REPO = Path(__file__).resolve().parents[1]
SHIPPED = fastdiff.list_models()
needs_shipped = pytest.mark.skipif("digits-ddpm" not in SHIPPED, reason="the shipped digits models are not built")


def run(*args, cwd=None, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    env["FASTDIFF_BACKEND"] = "torch"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "fastdiff", "-q", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def run_here(capsys, *args) -> subprocess.CompletedProcess:
    """``fastdiff -q ARGS`` in this process (``fastdiff.cli.main``): the exit code and what it printed, as
    :func:`run` returns them, without an interpreter start-up (for tests that call the command often)."""
    from fastdiff import cli

    capsys.readouterr()
    code = cli.main(["-q", *args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["fastdiff", "-q", *args], code, out.out, out.err)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny class-conditional pipeline folder, so CLI tests don't depend on the shipped weights."""
    from tests.test_pipelines import pixel_pipe

    folder = tmp_path_factory.mktemp("models") / "tiny"
    pipe = pixel_pipe()
    pipe.settings.update(description="tiny test model", default_steps=3, default_guidance_scale=2.0)
    pipe.save_pretrained(folder)
    return folder


def test_sample_writes_a_png_grid_and_same_seed_same_bytes(tmp_path, tiny_model):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    for out, seed in ((a, 1), (b, 1), (c, 2)):
        res = run("sample", "--model", str(tiny_model), "--num", "4", "--seed", str(seed), "--out", str(out))
        assert res.returncode == 0, res.stderr
        assert str(out) in res.stdout
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    with Image.open(a) as im:
        assert im.format == "PNG" and im.mode == "L" and im.size[0] > 8


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++", "euler", "euler-a", "lcm", "unipc", "heun", "pndm"])
def test_every_sampler(tmp_path, tiny_model, sampler):
    out = tmp_path / f"{sampler}.png"
    res = run("sample", "--model", str(tiny_model), "--num", "2", "--steps", "2", "--sampler", sampler,
              "--class", "3", "--guidance", "1.5", "--out", str(out), "--dtype", "bf16")
    assert res.returncode == 0, res.stderr
    assert out.is_file()


@pytest.mark.parametrize("args, message", [
    (["sample", "--model", "no-such-model"], "unknown model"),
    (["sample", "--sampler", "plms"], "sampler"),
    (["sample", "--steps", "0"], "--steps"),
    (["sample", "--steps", "-3"], "--steps"),
    (["sample", "--steps", "lots"], "--steps"),
    (["sample", "--num", "0"], "--num"),
    (["sample", "--class", "10"], "--class"),
    (["sample", "--device", "tpu"], "--device"),
    (["sample", "--out", "/nonexistent-dir/x.png"], "does not exist"),
    (["sample", "--steps", "5000"], "--steps"),
    (["train", "digits-nothing"], "unknown model"),
    (["frobnicate"], "invalid choice"),
])
def test_errors_are_one_line_and_exit_2(tmp_path, tiny_model, args, message):
    if args[0] == "sample" and "--model" not in args:
        args = [*args, "--model", str(tiny_model)]
    res = run(*args, cwd=tmp_path)
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not list(tmp_path.glob("*.png"))  # nothing written


def test_unwritable_output_and_class_for_unconditional_model(tmp_path):
    from tests.test_pipelines import pixel_pipe

    folder = tmp_path / "uncond"
    pixel_pipe(num_classes=None).save_pretrained(folder)
    res = run("sample", "--model", str(folder), "--class", "1", "--out", str(tmp_path / "x.png"))
    assert res.returncode == 2 and "unconditional" in res.stderr
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores directory permissions
            (tmp_path / "file").write_text("x")
            target = tmp_path / "file" / "x.png"
        else:
            target = locked / "x.png"
        res = run("sample", "--model", str(folder), "--out", str(target))
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    finally:
        locked.chmod(0o700)


def test_info_and_models():
    res = run("info", "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["ops"]["group_norm_silu"] == "torch"  # FASTDIFF_BACKEND=torch in run()
    res = run("models")
    assert res.returncode == 0
    for name in SHIPPED:
        assert name in res.stdout


def test_info_shows_the_native_cpu_path_and_what_dtype_auto_means():
    """Without FASTDIFF_BACKEND and the interpreter (a user's setting), the CPU runs the native GroupNorm+SiLU where
    the extension has it; `fastdiff info` says so, and what --dtype auto picks here."""
    from fastdiff import dispatch, native

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTDIFF_BACKEND")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-m", "fastdiff", "info", "--json"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["ops"]["group_norm_silu"] == ("native" if native.has_kernel("group_norm_silu_native", "cpu")
                                              else "torch")
    assert info["cpu_native_bf16"] is dispatch.cpu_has_native_bf16()
    assert info["dtype_auto"] == ("bfloat16" if dispatch.cpu_has_native_bf16() else "the weights' own (fp32)")
    text = subprocess.run([sys.executable, "-m", "fastdiff", "info"], capture_output=True, text=True, env=env,
                          timeout=300).stdout
    assert f"--dtype auto here: {info['dtype_auto']}" in text and "group_norm_silu" in text


@needs_shipped
def test_default_sample_command_makes_recognisable_digits(tmp_path):
    """`fastdiff sample` with no arguments: samples.png of the default model; the shipped classifier reads the
    requested digits (labels 0..9 cycling) from the grid's cells."""
    res = run("sample", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    png = tmp_path / "samples.png"
    assert png.is_file()
    res2 = run("sample", "--out", "again.png", cwd=tmp_path)
    assert res2.returncode == 0 and (tmp_path / "again.png").read_bytes() == png.read_bytes()
    images = fastdiff.load("digits-ddpm")(batch_size=16, class_labels=[i % 10 for i in range(16)],
                                          num_inference_steps=25, guidance_scale=2.0, generator=0, output_type="pt",
                                          progress=False)
    from fastdiff.evaluation import load_classifier

    pred = load_classifier()(images * 2 - 1).argmax(1)
    assert (pred == np.arange(16) % 10).sum() >= 13
