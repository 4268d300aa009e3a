"""fastdiff.hub: the one home of sampler names, the sampler swap, device/dtype resolution and the per-model sampling
defaults that the command (sample, eval, generate) and the library share."""

from __future__ import annotations

import sys

import pytest
import torch

import fastdiff
from fastdiff import cli, hub
from fastdiff.schedulers import DDIMScheduler, EulerDiscreteScheduler


def test_load_swaps_the_sampler_and_keeps_its_config():
    own = fastdiff.load("digits-ddpm")
    pipe = fastdiff.load("digits-ddpm", sampler="euler", dtype="fp16")
    assert type(own.scheduler) is DDIMScheduler and type(pipe.scheduler) is EulerDiscreteScheduler
    assert pipe.scheduler.config.num_train_timesteps == own.scheduler.config.num_train_timesteps
    assert next(pipe.unet.parameters()).dtype == torch.float16
    assert next(fastdiff.load("digits-ddpm", dtype=torch.bfloat16).unet.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("sampler, algorithm, order", [
    ("dpm++", "dpmsolver++", 2), ("dpm++-2m-sde", "sde-dpmsolver++", 2), ("dpm++-3m", "dpmsolver++", 3),
    ("dpm++-3m-sde", "sde-dpmsolver++", 3),
])
def test_dpm_sampler_names_set_the_solver(sampler, algorithm, order):
    pipe = fastdiff.load("digits-ddpm", sampler=sampler)
    assert (pipe.scheduler.settings.algorithm_type, pipe.scheduler.settings.solver_order) == (algorithm, order)
    images = pipe(batch_size=2, num_inference_steps=6, generator=0, output_type="pt", progress=False,
                  class_labels=[3, 7], guidance_scale=2.0)
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()


@pytest.mark.parametrize("sampler", sorted(hub.SAMPLERS))
def test_every_sampler_name_loads_and_samples(sampler):
    """Every short name (the CLI's --sampler choices) swaps in its scheduler class, with the name's options, and
    samples finite digits with guidance in the fused step."""
    if sampler == "dpm++-sde":
        pytest.importorskip("torchsde")  # the sde extra
    pipe = fastdiff.load("digits-ddpm", sampler=sampler)
    assert type(pipe.scheduler).__name__ == hub.SAMPLERS[sampler]
    for key, value in hub.SAMPLER_OPTIONS.get(sampler, {}).items():
        assert getattr(pipe.scheduler.settings, key) == value
    images = pipe(batch_size=2, num_inference_steps=4, generator=0, output_type="pt", progress=False,
                  class_labels=[3, 7], guidance_scale=2.0)
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all() and images.std() > 0.05


def test_sampler_needing_a_missing_optional_package_says_which(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchsde", None)  # as if the sde extra were not installed
    with pytest.raises(ImportError, match="torchsde"):
        fastdiff.load("digits-ddpm", sampler="dpm++-sde")
    assert cli.main(["-q", "sample", "--sampler", "dpm++-sde", "--num", "1", "--steps", "2"]) == 2
    assert "torchsde" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, error, match", [
    ({"sampler": "plms"}, ValueError, "--sampler must be one of"),
    ({"name_or_path": "digits-dcgan", "sampler": "ddim"}, ValueError, "--sampler: model 'digits-dcgan' has no"),
    ({"dtype": "fp64"}, ValueError, "--dtype must be one of"),
    ({"dtype": 16}, TypeError, "--dtype must be a name"),
    ({"device": "tpu"}, ValueError, "--device must be cpu or cuda"),
    ({"name_or_path": "no-such-model"}, ValueError, "unknown model 'no-such-model'"),
])
def test_load_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastdiff.load(**kwargs)


def test_sampling_defaults_of_a_class_conditional_model():
    pipe = fastdiff.load("digits-ddpm")
    d = hub.sampling_defaults(pipe)
    assert d.num_classes == 10
    assert d.steps == pipe.settings["default_steps"] and d.guidance == pipe.settings["default_guidance_scale"]
    assert d.class_labels(range(12)) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert d.call_kwargs() == {"num_inference_steps": d.steps, "guidance_scale": d.guidance}
    mine = hub.sampling_defaults(pipe, steps=7, guidance=1.5)
    assert (mine.steps, mine.guidance) == (7, 1.5)
    with pytest.raises(ValueError, match="--steps must be ≤ 1000"):
        hub.sampling_defaults(pipe, steps=1001, model="digits-ddpm")


def test_gans_take_no_steps_and_no_guidance():
    pipe = fastdiff.load("digits-dcgan")
    d = hub.sampling_defaults(pipe)
    assert d == hub.SamplingDefaults(None, None, None) and d.call_kwargs() == {} and d.class_labels([0]) is None
    with pytest.raises(ValueError, match="--steps: model 'digits-dcgan' samples in one step"):
        hub.sampling_defaults(pipe, steps=5, model="digits-dcgan")
    with pytest.raises(ValueError, match="--guidance: this model is unconditional"):
        hub.sampling_defaults(pipe, guidance=2.0)


def test_resolve_device():
    assert hub.resolve_device("cpu") == torch.device("cpu")
    assert hub.resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            hub.resolve_device("cuda")


def test_eval_command_uses_the_same_defaults(capsys):
    pytest.importorskip("sklearn")  # the held-out digits
    assert cli.main(["-q", "eval", "digits-ddpm", "--num", "10", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    auto = str(hub.resolve_dtype("auto") or torch.float32).replace("torch.", "")  # --dtype auto, the default
    assert f"model digits-ddpm: 10 samples, {auto}, 2 steps" in out and "histogram (0-9): 1 1 1 1 1 1 1 1 1 1" in out
    assert cli.main(["-q", "eval", "digits-ddpm", "--num", "10", "--steps", "2", "--dtype", "fp32"]) == 0
    assert "model digits-ddpm: 10 samples, float32, 2 steps" in capsys.readouterr().out
    assert cli.main(["-q", "eval", "digits-dcgan", "--num", "10", "--guidance", "2"]) == 2
    assert "--guidance: model 'digits-dcgan' is unconditional" in capsys.readouterr().err


@pytest.mark.parametrize("native_bf16", [True, False])
def test_dtype_auto_is_bf16_only_on_a_cpu_with_native_bf16(monkeypatch, native_bf16):
    """"auto": bf16 on a CPU whose flags have AVX512_BF16 or AMX-BF16, else the weights' own dtype (None); on CUDA
    always the weights' own (the GPU path keeps its dtype)."""
    from fastdiff import dispatch

    monkeypatch.setattr(dispatch, "cpu_has_native_bf16", lambda: native_bf16)
    want = torch.bfloat16 if native_bf16 else None
    assert hub.resolve_dtype("auto") is want and hub.resolve_dtype("auto", "cpu") is want
    assert hub.resolve_dtype("auto", torch.device("cuda")) is None
    assert fastdiff.load("digits-ddpm", dtype="auto").dtype == (want or torch.float32)
    assert "auto" in hub.DTYPE_CHOICES and cli.build_parser().parse_args(["sample"]).dtype == "auto"
    assert cli.build_parser().parse_args(["eval", "digits-ddpm"]).dtype == "auto"


def test_cpu_flags_decide_native_bf16(monkeypatch, tmp_path):
    """cpu_has_native_bf16 reads /proc/cpuinfo's flags: avx512_bf16 or amx_bf16 → True; plain AVX-512 → False."""
    import builtins

    from fastdiff import dispatch

    real_open = builtins.open
    for flags, want in (("fpu avx512f avx512bw avx512_bf16", True), ("fpu avx512f amx_bf16 amx_tile", True),
                        ("fpu avx2 avx512f avx512_vnni", False)):
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(builtins, "open", lambda path, *a, _f=cpuinfo, **k: real_open(
            _f if path == "/proc/cpuinfo" else path, *a, **k))
        dispatch.cpu_has_native_bf16.cache_clear()
        try:
            assert dispatch.cpu_has_native_bf16() is want, flags
        finally:
            monkeypatch.setattr(builtins, "open", real_open)
            dispatch.cpu_has_native_bf16.cache_clear()
