"""DiffusionPipeline.compile() (fastdiff/pipelines/compiled.py): compiled sampling equals eager sampling, frozen
weights changed in place are noticed and compiled again, bad options are refused before anything changes."""

from __future__ import annotations

import pytest
import torch

from fastdiff.models import UNet
from fastdiff.pipelines import DiffusionPipeline
from fastdiff.pipelines import compiled as compiled_module
from fastdiff.schedulers import DDIMScheduler
from tests.utils import assert_rel_close

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_pipe(seed=0):
    torch.manual_seed(seed)
    unet = UNet(in_channels=1, out_channels=1, base_channels=8, channel_mult=(1, 2), layers_per_block=1,
                attention_levels=(1,), norm_num_groups=4, attention_head_dim=8, num_classes=10).eval()
    return DiffusionPipeline(unet, DDIMScheduler(num_train_timesteps=100), sample_size=8)


def sample(pipe):
    return pipe(batch_size=2, num_inference_steps=3, generator=0, guidance_scale=2.0, class_labels=[3, 7],
                output_type="pt", progress=False)


@pytest.mark.parametrize("freeze", [False, True])
def test_compiled_sampling_matches_eager(freeze):
    pipe = tiny_pipe()
    eager = sample(pipe)
    assert pipe.compile(freeze=freeze, backend="aot_eager") is pipe
    first, second = sample(pipe), sample(pipe)
    assert_rel_close(first, eager, 1e-5, "compiled vs eager")
    assert torch.equal(first, second)
    assert pipe._compiled.compiles == 1  # set up once, reused by the second call
    pipe.disable_compile()
    assert torch.equal(sample(pipe), eager)


def test_frozen_weights_changed_in_place_compile_again(monkeypatch):
    pipe = tiny_pipe()
    pipe.compile(freeze=True, backend="aot_eager")
    sample(pipe)
    reset = []
    real_reset = torch._dynamo.reset_code
    monkeypatch.setattr(torch._dynamo, "reset_code", lambda code: (reset.append(code), real_reset(code)))
    sample(pipe)
    assert reset == [] and pipe._compiled.compiles == 1  # unchanged weights: nothing to do
    pipe.unet.load_state_dict(tiny_pipe(seed=1).unet.state_dict())  # in place: same storage, new values
    got = sample(pipe)
    assert pipe._compiled.compiles == 2 and reset == [UNet.forward.__code__]  # the stale frozen code dropped
    pipe.disable_compile()
    assert_rel_close(got, sample(pipe), 1e-5, "after the weights changed")


def test_inductor_freezing_on_the_cpu_sees_new_weights():
    """The real thing (inductor, freezing: the weights are constants of the compiled code): equal to eager, and
    still equal after the weights change in place — a stale frozen copy would differ."""
    pipe = tiny_pipe()
    eager = sample(pipe)
    pipe.compile()
    assert_rel_close(sample(pipe), eager, 1e-4, "inductor + freezing vs eager")
    pipe.unet.load_state_dict(tiny_pipe(seed=1).unet.state_dict())
    got = sample(pipe)
    pipe.disable_compile()
    new_eager = sample(pipe)
    assert not torch.allclose(new_eager, eager)
    assert_rel_close(got, new_eager, 1e-4, "inductor + freezing after the weights changed")


@pytest.mark.parametrize("kwargs, error, match", [
    ({"freeze": 1}, TypeError, "freeze"),
    ({"fullgraph": "yes"}, TypeError, "fullgraph"),
    ({"mode": "fast"}, ValueError, "mode"),
    ({"dynamic": "no"}, TypeError, "dynamic"),
    ({"backend": 3}, TypeError, "backend"),
])
def test_bad_options_are_refused_before_anything_changes(kwargs, error, match):
    pipe = tiny_pipe()
    with pytest.raises(error, match=match):
        pipe.compile(**kwargs)
    assert pipe._compiled is None


def test_a_compile_never_reuses_code_compiled_with_other_settings():
    """Frozen first, then not frozen, with the weights changed in between: the unfrozen compile must not reuse the
    code frozen on the old weights (torch.compile's guards do not cover inductor's settings)."""
    pipe = tiny_pipe()
    pipe.compile()
    sample(pipe)
    pipe.unet.load_state_dict(tiny_pipe(seed=1).unet.state_dict())
    pipe.compile(freeze=False)
    got = sample(pipe)
    pipe.disable_compile()
    assert_rel_close(got, sample(pipe), 1e-4, "unfrozen compile after a frozen one")


def test_weights_fingerprint_sees_in_place_updates():
    unet = tiny_pipe().unet
    before = compiled_module.weights_fingerprint(unet)
    assert compiled_module.weights_fingerprint(unet) == before
    with torch.no_grad():
        next(unet.parameters()).add_(1.0)
    assert compiled_module.weights_fingerprint(unet) != before
