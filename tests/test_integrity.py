"""No silent bad images: weights with NaN/Inf are refused at load (naming the tensor, with an opt-out), NaN/Inf while
sampling ends ``fastdiff sample`` with one line and exit 1 (no traceback), ``fastdiff generate`` never writes an
image made of non-finite values (it lists the index and a rerun remakes it), and model folders carry the sha256 of
their weight files, checked on load (a damaged file is named) and by ``fastdiff info --verify``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from model_factories import tiny_text_pipeline
from safetensors.torch import load_file, save_file

import fastdiff
import fastdiff.assets as assets_package
from fastdiff import integrity
from fastdiff.assets import ASSETS
from fastdiff.integrity import CHECKSUMS, CorruptedModelError, verify_folder, write_checksums
from fastdiff.models import UNet, load_model
from fastdiff.models.modeling import allow_non_finite_weights
from fastdiff.pipelines.base import NonFiniteError
from tests.test_cli import run, run_here

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)


def tiny_unet():
    torch.manual_seed(0)
    return UNet(in_channels=1, out_channels=1, base_channels=8, channel_mult=(1, 2), layers_per_block=1,
                attention_levels=(1,), norm_num_groups=4, attention_head_dim=8, num_classes=10).eval()


def poison(weights_file, name: str, value: float, index: int = 3) -> None:
    """Set one element of tensor ``name`` in a safetensors file to ``value``."""
    state = load_file(str(weights_file))
    flat = state[name].flatten().clone()
    flat[index] = value
    state[name] = flat.view(state[name].shape)
    save_file(state, str(weights_file))


# --------------------------------------------------------------------------------------------- 1. non-finite weights
@pytest.mark.parametrize("value, what", [(float("nan"), "1 NaN, 0 ±Inf"), (float("-inf"), "0 NaN, 1 ±Inf")])
def test_a_nan_or_inf_weight_is_refused_naming_the_tensor(tmp_path, value, what):
    tiny_unet().save_pretrained(tmp_path / "unet")
    poison(tmp_path / "unet" / "model.safetensors", "conv_in.weight", value)
    for load in (lambda **kw: UNet.from_pretrained(tmp_path / "unet", **kw),
                 lambda **kw: load_model(tmp_path / "unet", **kw)):
        with pytest.raises(ValueError, match=r"tensor 'conv_in.weight' holds 1 non-finite value\(s\)") as info:
            load()
        assert what in str(info.value) and "allow_non_finite=True" in str(info.value)
        model = load(allow_non_finite=True)  # the opt-out: loaded as stored
        assert int((~torch.isfinite(model.conv_in.weight)).sum()) == 1
    with allow_non_finite_weights():
        assert not torch.isfinite(UNet.from_pretrained(tmp_path / "unet").conv_in.weight).all()
    with allow_non_finite_weights(), pytest.raises(ValueError, match="non-finite"):  # an explicit False wins
        UNet.from_pretrained(tmp_path / "unet", allow_non_finite=False)


def test_a_pipeline_folder_with_a_nan_weight_and_the_cli(tmp_path, capsys):
    """fastdiff.load refuses it naming the file and tensor; allowed, sampling stops with NonFiniteError naming the step;
    ``fastdiff sample`` prints one line (exit 2 for the refused load), nothing written."""
    pipe = tiny_text_pipeline(seed=0)
    pipe.save_pretrained(tmp_path / "model")
    poison(tmp_path / "model" / "unet" / "model.safetensors", "conv_out.weight", float("nan"))
    with pytest.raises(ValueError, match=r"unet[/\\]model.safetensors: tensor 'conv_out.weight'"):
        fastdiff.load(tmp_path / "model")
    loaded = fastdiff.load(tmp_path / "model", allow_non_finite=True)
    with pytest.raises(NonFiniteError, match=r"step 1/2"):
        loaded(prompt="3", num_inference_steps=2, generator=0, progress=False)
    res = run_here(capsys, "sample", "--model", str(tmp_path / "model"), "--prompt", "3", "--num", "2", "--out",
                   str(tmp_path / "x.png"))
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "conv_out.weight" in lines[0], res.stderr
    assert not (tmp_path / "x.png").exists()


def test_nan_while_sampling_is_one_line_and_exit_1_without_a_traceback(tmp_path):
    """Finite weights that overflow (a huge output convolution): the load passes, sampling meets Inf/NaN; the CLI
    turns the pipeline's NonFiniteError into one line naming the step and exits 1."""
    pipe = tiny_text_pipeline(seed=0)
    with torch.no_grad():
        pipe.unet.conv_out.weight.fill_(3e38)
    pipe.save_pretrained(tmp_path / "model")
    res = run("sample", "--model", str(tmp_path / "model"), "--prompt", "3", "--num", "2", "--steps", "2", "--dtype",
              "fp32", "--out", str(tmp_path / "x.png"))
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert len(lines) == 1 and lines[0].startswith("fastdiff: error: NaN/Inf in the latents at step 1/2"), res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------------------------- 2. generate
def test_generate_never_writes_a_non_finite_image_and_a_rerun_remakes_it(tmp_path, monkeypatch):
    """digits-dcgan's pipeline made flaky: a batch holding image 2 stops with NonFiniteError (as a diffusion pipeline
    does on NaN latents) and image 5 comes back with a NaN pixel. Neither is written; both are listed; the other
    images of their batches are kept; a rerun makes exactly those two, equal to a clean run's."""
    from fastdiff.generate import generate
    from fastdiff.generate.job import image_seed
    from fastdiff.pipelines import GANPipeline

    real_call = GANPipeline.__call__
    bad, nan, calls = image_seed(0, 2), image_seed(0, 5), []

    def flaky_call(self, **kwargs):
        seeds = [g.initial_seed() for g in kwargs["generator"]]
        calls.append(len(seeds))
        if bad in seeds:
            raise NonFiniteError("NaN/Inf in the latents at step 2/2 (t=1)")
        images = real_call(self, **kwargs)
        for row, s in enumerate(seeds):
            if s == nan:
                images[row, 0, 0, 0] = np.nan
        return images

    monkeypatch.setattr(GANPipeline, "__call__", flaky_call)
    out = tmp_path / "out"
    summary = generate("digits-dcgan", 8, out, batch=4, fmt="npz", device="cpu", progress=False)
    written = sorted(p.name for p in out.glob("*.npz"))
    assert summary["failed"] == [2, 5] and summary["new"] == 6
    assert written == [f"{i:06d}.npz" for i in (0, 1, 3, 4, 6, 7)]
    for name in written:
        assert np.isfinite(np.load(out / name)["image"]).all()
    # the failing batch (0-3) was remade one index at a time, in batches of 4 (the same shape)
    assert calls == [4, 4, 4, 4, 4, 4]
    monkeypatch.setattr(GANPipeline, "__call__", real_call)
    again = generate("digits-dcgan", 8, out, batch=4, fmt="npz", device="cpu", progress=False)
    assert again["new"] == 2 and again["skipped"] == 6 and again["failed"] == []
    clean = generate("digits-dcgan", 8, tmp_path / "clean", batch=4, fmt="npz", device="cpu", progress=False)
    assert clean["failed"] == []
    for i in range(8):
        a, b = np.load(out / f"{i:06d}.npz")["image"], np.load(tmp_path / "clean" / f"{i:06d}.npz")["image"]
        assert np.array_equal(a, b), i


def test_format_summary_lists_the_failed_indices():
    from fastdiff.generate import format_summary

    line = format_summary({"new": 6, "outdir": "o", "skipped": 0, "count": 8, "seconds": 1.0, "images_per_s": 6.0,
                           "world": 1, "per_rank": [6.0], "failed": [2, 5]})
    assert "2 failed with NaN/Inf and not written (indices 2, 5): rerun to remake them" in line


# --------------------------------------------------------------------------------------------- 3. checksums
def test_every_shipped_folder_records_and_matches_the_sha256_of_its_weight_files():
    report = integrity.verify_assets()
    assert set(report) == {*fastdiff.list_models(), "digits-classifier"}
    for name, files in report.items():
        assert isinstance(files, list), files
        record = json.loads((ASSETS / name / CHECKSUMS).read_text())["files"]
        assert sorted(record) == files == sorted(p.relative_to(ASSETS / name).as_posix()
                                                 for p in (ASSETS / name).rglob("*.safetensors"))
        for rel, entry in record.items():  # recomputed here
            data = (ASSETS / name / rel).read_bytes()
            assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


@pytest.fixture
def model_copy(tmp_path):
    """A copy of the shipped digits-ddpm folder (with its checksums.json)."""
    folder = tmp_path / "digits-ddpm"
    shutil.copytree(ASSETS / "digits-ddpm", folder)
    return folder


def test_a_damaged_weight_file_is_named_on_load(model_copy):
    weights = model_copy / "unet" / "model.safetensors"
    assert fastdiff.load(model_copy) is not None
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in a weight: still a valid safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptedModelError, match=r"unet[/\\]model.safetensors: sha256 .* differs from the .* "
                                                  r"recorded in checksums.json"):
        fastdiff.load(model_copy)
    weights.write_bytes(bytes(data[:-10]))  # truncated
    with pytest.raises(CorruptedModelError, match=r"bytes, \d+ recorded"):
        fastdiff.load(model_copy)
    weights.unlink()
    with pytest.raises(CorruptedModelError, match="missing"):
        fastdiff.load(model_copy)


def test_unrecorded_weights_and_a_bad_record_are_refused(model_copy):
    shutil.copy(model_copy / "unet" / "model.safetensors", model_copy / "unet" / "extra.safetensors")
    with pytest.raises(CorruptedModelError, match=r"not recorded"):
        verify_folder(model_copy)
    (model_copy / "unet" / "extra.safetensors").unlink()
    (model_copy / CHECKSUMS).write_text("{not json")
    with pytest.raises(CorruptedModelError, match="unreadable"):
        fastdiff.load(model_copy)
    (model_copy / CHECKSUMS).unlink()
    assert verify_folder(model_copy) == []  # no record: nothing to check (a folder saved by hand)
    with pytest.raises(CorruptedModelError, match="no checksums.json"):
        verify_folder(model_copy, required=True)
    write_checksums(model_copy)
    assert verify_folder(model_copy) == ["unet/model.safetensors"]


def test_each_file_is_hashed_once_while_its_size_and_mtime_stay(model_copy, monkeypatch):
    opened = []
    real_sha256 = hashlib.sha256
    monkeypatch.setattr(integrity.hashlib, "sha256", lambda *a: opened.append(1) or real_sha256(*a))
    monkeypatch.setattr(integrity, "_HASHED", {})
    verify_folder(model_copy)
    verify_folder(model_copy)
    fastdiff.load(model_copy)
    assert len(opened) == 1
    weights = model_copy / "unet" / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # rewritten: a new mtime, hashed again (and still matching)
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    verify_folder(model_copy)
    assert len(opened) == 2


def test_a_trained_folder_gets_its_checksums(tmp_path):
    from fastdiff import training

    training.train("digits-dcgan", tmp_path / "gan", steps=1, progress=False)
    assert verify_folder(tmp_path / "gan", required=True) == ["generator/model.safetensors"]


def test_info_verify(tmp_path, monkeypatch, capsys):
    res = run_here(capsys, "info", "--verify")
    assert res.returncode == 0, res.stderr
    assert f"{len(fastdiff.list_models()) + 1} of {len(fastdiff.list_models()) + 1} shipped folders verified" \
        in res.stdout
    # a damaged install: the report names the folder and file, exit 1
    assets = tmp_path / "assets"
    shutil.copytree(ASSETS / "digits-ddpm", assets / "digits-ddpm")
    weights = assets / "digits-ddpm" / "unet" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(assets_package, "ASSETS", assets)
    report = integrity.verify_assets()
    assert list(report) == ["digits-ddpm"] and "sha256" in report["digits-ddpm"]
    assert "reinstall" in report["digits-ddpm"]  # under the assets folder: the install is damaged
    from fastdiff import cli

    assert cli._verify_assets(as_json=False) == 1
