"""TextToImagePipeline with a ControlNet: the controlled loop against a plain loop written here (ControlNet and UNet
called by hand, the CFG combine, DDIM in float64), guess mode, scale 0 = no control exactly, the control map's input
forms (tensor, numpy, PIL, lists, resizing, RGB → gray, batching), argument errors before any work, the extension
folder (save_extension → fastdiff.load, base_model resolution and loops), the base weights untouched, CUDA graphs of
the controlled denoiser (on the CPU with tests/test_cuda_graph.py's fakes) and ``fastdiff sample --control``.

The tiny text pipeline of tests/model_factories.py (16×16 images, 8×8 latents) with a ControlNet whose conditioning
embedding halves once ((8, 8): a 16×16 map → the 8×8 latent grid) and whose zero convolutions are perturbed, so the
control changes the images."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from model_factories import tiny_text_pipeline
from PIL import Image
from test_text_to_image import STEPS, Calls, close, ddim_reference, differ, encode, noise, sample

import fastdiff
from fastdiff import hub
from fastdiff.models import ControlNet, UNet
from fastdiff.pipelines import TextToImagePipeline, save_extension
from fastdiff.pipelines.base import INDEX_NAME, base_model_path
from fastdiff.pipelines.controlnet import LUMA, ControlledUNet, prepare_control_image
from fastdiff.pipelines.cuda_graph import GraphCache
from tests.test_cli import run
from tests.test_cuda_graph import fake_cuda  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)

P0, P1 = "a bold seven", "the digit 3, slanted left"


def make_controlnet(unet, seed: int = 3) -> ControlNet:
    """A ControlNet for ``unet`` whose zero convolutions (and the embedding's conv_out) are random, so it acts."""
    controlnet = ControlNet.from_unet(unet, conditioning_channels=1, conditioning_embedding_out_channels=(8, 8))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                       controlnet.controlnet_cond_embedding.conv_out]:
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return controlnet.eval()


@pytest.fixture
def pipe():
    """The tiny text pipeline with a perturbed ControlNet attached."""
    pipe = tiny_text_pipeline(seed=0)
    pipe.controlnet = make_controlnet(pipe.unet)
    return pipe


def edge_maps(batch: int, seed: int = 2, size: int = 16) -> torch.Tensor:
    """Random binary maps (batch, 1, size, size) in {0, 1}."""
    return (torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(seed)) > 0.7).float()


def controlled_eps(pipe, x, t_batch, context, control, scale, guess=False, use_control=True):
    """The UNet's ε with the ControlNet's residuals, as diffusers' pipeline computes one half of the batch."""
    if not use_control:
        return pipe.unet(x, t_batch, context=context)
    down, mid = pipe.controlnet(x, t_batch, control, conditioning_scale=scale, context=context, guess_mode=guess)
    return pipe.unet(x, t_batch, context=context, down_block_additional_residuals=down,
                     mid_block_additional_residual=mid)


def reference_sample(pipe, prompts, guidance: float, latents, control, scale: float = 1.0, guess: bool = False):
    """A plain controlled sampler (test_text_to_image.ddim_reference): the conditional and unconditional halves in
    separate passes, each with the ControlNet on its own input, context and the same control map (guess mode: the
    unconditional half without the ControlNet), against the empty prompt."""
    cond = encode(pipe, prompts)
    uncond = encode(pipe, [""] * len(prompts)) if guidance != 1.0 else None

    def eps(x, t_batch, context, unconditional):
        use_control = not (guess and unconditional)
        return controlled_eps(pipe, x, t_batch, context, control, scale, guess, use_control=use_control)

    return ddim_reference(pipe, cond, uncond, guidance, latents, eps)


# --------------------------------------------------------------------------------------------- 1. against a plain loop
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_controlled_cfg_matches_a_plain_loop(pipe, scale):
    latents, control = noise(2), edge_maps(2)
    ref = reference_sample(pipe, [P0, P1], 3.0, latents, control, scale)
    calls = Calls(pipe)
    out = sample(pipe, prompt=[P0, P1], guidance_scale=3.0, latents=latents, image=control,
                 controlnet_conditioning_scale=scale)
    calls.remove()
    assert out.shape == (2, 1, 16, 16)
    close(out, ref)
    # the ControlNet runs on the UNet's [uncond; cond] batch, once per step
    assert calls.log["controlnet"] == calls.log["unet"] == [4] * STEPS
    # the control does something here (so the comparison can fail), and each image follows its own map
    plain = sample(pipe, prompt=[P0, P1], guidance_scale=3.0, latents=latents)
    differ(out, plain)
    differ(out, sample(pipe, prompt=[P0, P1], guidance_scale=3.0, latents=latents, image=control.flip(0),
                       controlnet_conditioning_scale=scale))


def test_without_guidance_matches_a_plain_loop(pipe):
    latents, control = noise(2), edge_maps(2)
    calls = Calls(pipe)
    out = sample(pipe, prompt=[P0, P1], guidance_scale=1.0, latents=latents, image=control)
    calls.remove()
    close(out, reference_sample(pipe, [P0, P1], 1.0, latents, control))
    assert calls.log["controlnet"] == calls.log["unet"] == [2] * STEPS


@pytest.mark.parametrize("guidance", [3.0, 1.0])
def test_guess_mode_matches_a_plain_loop(pipe, guidance):
    """Under guidance the ControlNet sees the conditional half only (the unconditional half gets no residuals); its
    residuals ramp from 0.1 to 1 (also without guidance)."""
    latents, control = noise(2), edge_maps(2)
    calls = Calls(pipe)
    out = sample(pipe, prompt=[P0, P1], guidance_scale=guidance, latents=latents, image=control, guess_mode=True,
                 controlnet_conditioning_scale=0.8)
    calls.remove()
    close(out, reference_sample(pipe, [P0, P1], guidance, latents, control, 0.8, guess=True))
    assert calls.log["controlnet"] == [2] * STEPS
    assert calls.log["unet"] == [4 if guidance != 1.0 else 2] * STEPS
    differ(out, sample(pipe, prompt=[P0, P1], guidance_scale=guidance, latents=latents, image=control,
                       controlnet_conditioning_scale=0.8))


def test_a_globally_pooled_controlnet_runs_on_the_conditional_half(pipe):
    """diffusers: ``global_pool_conditions`` turns guess mode's split batch on (without the ramp)."""
    pooled = ControlNet.from_unet(pipe.unet, conditioning_channels=1, conditioning_embedding_out_channels=(8, 8),
                                  global_pool_conditions=True)
    pooled.load_state_dict(pipe.controlnet.state_dict())
    pipe.controlnet = pooled.eval()
    latents, control = noise(2), edge_maps(2)
    calls = Calls(pipe)
    out = sample(pipe, prompt=[P0, P1], guidance_scale=3.0, latents=latents, image=control)
    calls.remove()
    assert calls.log["controlnet"] == [2] * STEPS
    close(out, reference_sample(pipe, [P0, P1], 3.0, latents, control, 1.0, guess=True))


@pytest.mark.parametrize("guess", [False, True])
def test_scale_zero_is_the_base_model_exactly(pipe, guess):
    latents, control = noise(2), edge_maps(2)
    base = sample(pipe, prompt=[P0, P1], guidance_scale=3.0, latents=latents)
    zero = sample(pipe, prompt=[P0, P1], guidance_scale=3.0, latents=latents, image=control,
                  controlnet_conditioning_scale=0.0, guess_mode=guess)
    assert torch.equal(zero, base)
    pipe.controlnet = None  # and the same as the pipeline without a ControlNet
    assert torch.equal(sample(pipe, prompt=[P0, P1], guidance_scale=3.0, latents=latents), base)


def test_the_default_scale_comes_from_the_settings(pipe):
    latents, control = noise(1), edge_maps(1)
    half = sample(pipe, prompt=P0, latents=latents, image=control, controlnet_conditioning_scale=0.5)
    pipe.settings["default_controlnet_conditioning_scale"] = 0.5
    assert torch.equal(sample(pipe, prompt=P0, latents=latents, image=control), half)


def test_a_distilled_unet_takes_the_control_too():
    """A guidance-distilled UNet (guidance as an input) runs once per step on the prompts, with the ControlNet."""
    text = tiny_text_pipeline(seed=0)
    torch.manual_seed(0)
    unet = UNet(in_channels=2, out_channels=2, base_channels=8, channel_mult=(1, 2), layers_per_block=1,
                attention_levels=(0, 1), norm_num_groups=4, attention_head_dim=8, context_dim=16,
                guidance_embedding_dim=16).eval()
    pipe = TextToImagePipeline(unet, text.vae, text.scheduler, text.text_encoder, text.tokenizer, sample_size=8,
                               controlnet=make_controlnet(unet))
    latents, control = noise(1), edge_maps(1)
    calls = Calls(pipe)
    out = sample(pipe, prompt=P0, guidance_scale=4.0, latents=latents, image=control)
    calls.remove()
    assert calls.log["controlnet"] == calls.log["unet"] == [1] * STEPS
    differ(out, sample(pipe, prompt=P0, guidance_scale=4.0, latents=latents))


# --------------------------------------------------------------------------------------------- 2. control map forms
def test_input_forms_give_the_same_maps():
    m = edge_maps(1)[0, 0]  # (16, 16) in {0, 1}
    expected = m[None, None]
    as_uint8 = (m.numpy() * 255).astype(np.uint8)
    forms = {
        "tensor (1, C, H, W)": m[None, None],
        "tensor (C, H, W)": m[None],
        "float array (H, W)": m.numpy(),
        "float64 array (H, W, 1)": m.double().numpy()[..., None],
        "array (B, H, W, C)": m.numpy()[None, ..., None],
        "uint8 array": as_uint8,
        "bool array": m.numpy() > 0.5,
        "PIL L": Image.fromarray(as_uint8, mode="L"),
        "PIL 1": Image.fromarray(as_uint8, mode="L").convert("1"),
        "list of one PIL": [Image.fromarray(as_uint8, mode="L")],
    }
    for name, form in forms.items():
        got = prepare_control_image(form, 1, (16, 16), 1, 1)
        assert got.shape == (1, 1, 16, 16) and got.dtype == torch.float32, name
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=name)


def test_rgb_becomes_gray_with_the_luma_weights():
    rgb = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    expected = torch.from_numpy((rgb.astype(np.float32) / 255 * np.asarray(LUMA, np.float32)).sum(-1))[None, None]
    for form in (rgb, Image.fromarray(rgb, mode="RGB"), [Image.fromarray(rgb, mode="RGB")], rgb[None]):
        torch.testing.assert_close(prepare_control_image(form, 1, (16, 16), 1, 1), expected.clamp(0, 1))
    # PIL's own conversion agrees to within rounding to 8 bits
    pil_gray = np.asarray(Image.fromarray(rgb, mode="RGB").convert("L"), np.float32) / 255
    np.testing.assert_allclose(expected[0, 0].numpy(), pil_gray, atol=1 / 255)
    # gray → RGB for a 3-channel ControlNet
    gray = prepare_control_image(rgb[..., 0], 3, (16, 16), 1, 1)
    assert gray.shape == (1, 3, 16, 16) and torch.equal(gray[:, 0], gray[:, 2])


def test_another_size_is_resized_bilinear_and_kept_in_range(pipe):
    big = edge_maps(1, size=32)
    expected = F.interpolate(big, size=(16, 16), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    got = prepare_control_image(big, 1, (16, 16), 1, 1)
    assert torch.equal(got, expected) and 0 <= got.min() and got.max() <= 1
    small = prepare_control_image(edge_maps(1, size=5), 1, (16, 16), 1, 1)  # upsampled, non-square targets too
    assert small.shape == (1, 1, 16, 16) and 0 <= small.min() and small.max() <= 1
    assert prepare_control_image(edge_maps(1, size=16), 1, (8, 12), 1, 1).shape == (1, 1, 8, 12)
    # end to end: a 32×32 map samples as its resized 16×16 map
    latents = noise(1)
    assert torch.equal(sample(pipe, prompt=P0, latents=latents, image=big),
                       sample(pipe, prompt=P0, latents=latents, image=expected))


def test_batching_one_per_prompt_or_per_image_or_one_for_all():
    maps = edge_maps(4)
    # one for all
    assert torch.equal(prepare_control_image(maps[:1], 1, (16, 16), 2, 2), maps[:1].expand(4, -1, -1, -1))
    # one per prompt: repeated for the prompt's images (prompt 0's images first)
    assert torch.equal(prepare_control_image(maps[:2], 1, (16, 16), 2, 2), maps[[0, 0, 1, 1]])
    # one per image
    assert torch.equal(prepare_control_image(maps, 1, (16, 16), 2, 2), maps)
    # a list concatenates its items' batches
    assert torch.equal(prepare_control_image([maps[0], maps[1:3], maps[3].numpy()[0]], 1, (16, 16), 2, 2), maps)


def test_pil_numpy_list_and_tensor_sample_the_same(pipe):
    control = edge_maps(2)
    latents = noise(4)
    pixels = [(c[0].numpy() * 255).astype(np.uint8) for c in control]
    by_tensor = sample(pipe, prompt=[P0, P1], latents=latents, image=control, num_images_per_prompt=2)
    by_pil = sample(pipe, prompt=[P0, P1], latents=latents, image=[Image.fromarray(p) for p in pixels],
                    num_images_per_prompt=2)
    by_array = sample(pipe, prompt=[P0, P1], latents=latents, image=np.stack(pixels)[..., None],
                      num_images_per_prompt=2)
    assert torch.equal(by_tensor, by_pil) and torch.equal(by_tensor, by_array)
    # one map broadcasts: the same as giving it to every image
    one = sample(pipe, prompt=[P0, P1], latents=latents, image=control[:1], num_images_per_prompt=2)
    assert torch.equal(one, sample(pipe, prompt=[P0, P1], latents=latents, image=control[[0, 0, 0, 0]],
                                   num_images_per_prompt=2))


# --------------------------------------------------------------------------------------------- 3. errors before work
BAD = [
    ("image without a controlnet", dict(image=edge_maps(1)), ValueError, "needs a ControlNet"),
    ("wrong channels tensor", dict(image=torch.rand(1, 3, 16, 16)), ValueError, "conditioning_channels=1"),
    ("int tensor", dict(image=torch.ones(1, 1, 16, 16, dtype=torch.int64)), TypeError, "image: a tensor must be"),
    ("tensor out of range", dict(image=edge_maps(1) * 2), ValueError, "[0, 1]"),
    ("nan tensor", dict(image=torch.full((1, 1, 16, 16), float("nan"))), ValueError, "[0, 1]"),
    ("5-d tensor", dict(image=torch.rand(1, 1, 1, 16, 16)), ValueError, "(B, C, H, W)"),
    ("float array out of range", dict(image=np.full((16, 16), 1.5)), ValueError, "[0, 1]"),
    ("int32 array", dict(image=np.ones((16, 16), np.int32)), TypeError, "uint8"),
    ("4-channel array", dict(image=np.ones((16, 16, 4), np.uint8)), ValueError, "4 channels"),
    ("a str", dict(image="edge.png"), TypeError, "image must be"),
    ("empty list", dict(image=[]), ValueError, "empty"),
    ("batch mismatch", dict(image=edge_maps(3)), ValueError, "holds 3 control maps"),
    ("scale a str", dict(image=edge_maps(1), controlnet_conditioning_scale="1"), TypeError,
     "controlnet_conditioning_scale must be a real number"),
    ("scale a bool", dict(image=edge_maps(1), controlnet_conditioning_scale=True), TypeError,
     "controlnet_conditioning_scale"),
    ("scale inf", dict(image=edge_maps(1), controlnet_conditioning_scale=math.inf), ValueError,
     "controlnet_conditioning_scale must be finite"),
    ("scale without image", dict(controlnet_conditioning_scale=0.5), ValueError,
     "controlnet_conditioning_scale needs image"),
    ("guess mode not a bool", dict(image=edge_maps(1), guess_mode=1), TypeError, "guess_mode must be a bool"),
    ("guess mode without image", dict(guess_mode=True), ValueError, "guess_mode needs image"),
]


@pytest.mark.parametrize("case, kwargs, error, message", BAD, ids=[b[0] for b in BAD])
def test_bad_control_arguments_fail_before_any_work(pipe, case, kwargs, error, message):
    if case == "image without a controlnet":
        pipe.controlnet = None
    calls = Calls(pipe)
    with pytest.raises(error) as info:
        sample(pipe, prompt=[P0, P1], guidance_scale=3.0, **kwargs)
    calls.remove()
    assert message in str(info.value)
    assert not calls.any(), calls.log


def test_a_controlnet_of_another_unet_or_device_fails_before_any_work(pipe):
    other = UNet(in_channels=2, out_channels=2, base_channels=8, channel_mult=(1, 2, 2), layers_per_block=1,
                 attention_levels=(1,), norm_num_groups=4, attention_head_dim=8, context_dim=16)
    with pytest.raises(ValueError, match="does not match the UNet"):
        TextToImagePipeline(pipe.unet, pipe.vae, pipe.scheduler, pipe.text_encoder, pipe.tokenizer, sample_size=8,
                            controlnet=ControlNet.from_unet(other))
    with pytest.raises(TypeError, match="controlnet must be a fastdiff.models.ControlNet"):
        TextToImagePipeline(pipe.unet, pipe.vae, pipe.scheduler, pipe.text_encoder, pipe.tokenizer, sample_size=8,
                            controlnet=pipe.unet)
    for controlnet, error, message in ((ControlNet.from_unet(other), ValueError, "does not match the UNet"),
                                       (make_controlnet(pipe.unet).double(), ValueError, "torch.float64")):
        pipe.controlnet = controlnet
        calls = Calls(pipe)
        with pytest.raises(error, match=message):
            sample(pipe, prompt=P0, image=edge_maps(1))
        calls.remove()
        assert not calls.any()


# --------------------------------------------------------------------------------------------- 4. weights untouched
def test_base_weights_are_unchanged_by_attaching_sampling_and_detaching():
    pipe = tiny_text_pipeline(seed=0)
    before = {name: {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()}
              for name in ("unet", "vae", "text_encoder")}
    latents, control = noise(1), edge_maps(1)
    plain = sample(pipe, prompt=P0, latents=latents)
    pipe.controlnet = make_controlnet(pipe.unet)
    differ(sample(pipe, prompt=P0, latents=latents, image=control), plain)
    pipe.controlnet = None
    for name, state in before.items():
        after = getattr(pipe, name).state_dict()
        assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items()), name
    assert torch.equal(sample(pipe, prompt=P0, latents=latents), plain)


# --------------------------------------------------------------------------------------------- 5. saving and loading
def test_no_controlnet_saves_as_null_and_a_controlnet_round_trips(tmp_path, pipe):
    plain = tiny_text_pipeline(seed=0)
    plain.save_pretrained(tmp_path / "plain")
    index = json.loads((tmp_path / "plain" / INDEX_NAME).read_text())
    assert "controlnet" in index and index["controlnet"] is None
    assert fastdiff.load(tmp_path / "plain").controlnet is None
    pipe.save_pretrained(tmp_path / "full")
    loaded = fastdiff.load(tmp_path / "full")
    assert isinstance(loaded.controlnet, ControlNet)
    latents, control = noise(1), edge_maps(1)
    assert torch.equal(sample(loaded, prompt=P0, latents=latents, image=control),
                       sample(pipe, prompt=P0, latents=latents, image=control))


def test_extension_folder_loads_the_base_with_the_controlnet(tmp_path, pipe):
    base = tiny_text_pipeline(seed=0)
    base.save_pretrained(tmp_path / "base")
    folder = save_extension(tmp_path / "cn", "../base", {"controlnet": pipe.controlnet},
                            settings={"description": "tiny ControlNet", "default_steps": 3,
                                      "default_controlnet_conditioning_scale": 0.7})
    assert folder == tmp_path / "cn"
    # the folder: the index and the ControlNet, nothing else
    assert sorted(p.name for p in folder.iterdir()) == ["controlnet", INDEX_NAME]
    assert sorted(p.name for p in (folder / "controlnet").iterdir()) == ["config.json", "model.safetensors"]
    index = json.loads((folder / INDEX_NAME).read_text())
    assert index["_class_name"] == "TextToImagePipeline" and index["base_model"] == "../base"
    assert index["controlnet"] == ["fastdiff", "ControlNet"] and index["_fastdiff_version"] == fastdiff.__version__
    assert set(index) == {"_class_name", "_fastdiff_version", "base_model", "settings", "controlnet"}

    loaded = fastdiff.load(folder)
    assert isinstance(loaded, TextToImagePipeline) and isinstance(loaded.controlnet, ControlNet)
    # settings: the folder's over the base's
    assert loaded.settings["default_steps"] == 3 and loaded.settings["default_guidance_scale"] == 3.0
    assert loaded.settings["description"] == "tiny ControlNet" and loaded.settings["sample_size"] == 8
    assert hub.model_settings(folder) == loaded.settings
    latents, control = noise(2), edge_maps(2)
    pipe.settings.update(default_steps=3, default_controlnet_conditioning_scale=0.7)
    expected = pipe(prompt=[P0, P1], latents=latents, image=control, output_type="pt", progress=False)
    got = loaded(prompt=[P0, P1], latents=latents, image=control, output_type="pt", progress=False)
    assert torch.equal(got, expected)
    # the class check of from_pretrained, and a pipeline class the base is not
    assert isinstance(TextToImagePipeline.from_pretrained(folder), TextToImagePipeline)
    with pytest.raises(ValueError, match="not a VQPipeline"):
        save_extension(tmp_path / "x", "../base", {"unet": pipe.unet}, pipeline_class="VQPipeline")


def test_base_model_resolution_ignores_the_current_directory(tmp_path, monkeypatch):
    shipped = hub.list_models()
    if "digits-sd" not in shipped:
        pytest.skip("digits-sd is not shipped here")
    (tmp_path / "digits-sd").mkdir()
    tiny_text_pipeline().save_pretrained(tmp_path / "digits-sd")  # a same-named folder in the current directory
    monkeypatch.chdir(tmp_path)
    assert base_model_path(tmp_path / "ext", "digits-sd") == hub.ASSETS / "digits-sd"
    # a folder relative to the extension folder wins over a shipped name
    assert base_model_path(tmp_path, "digits-sd") == tmp_path / "digits-sd"
    with pytest.raises(ValueError, match="base_model 'nowhere' is neither a shipped model"):
        base_model_path(tmp_path / "ext", "nowhere")


def test_base_model_loops_are_refused(tmp_path, pipe):
    cn = pipe.controlnet
    tiny_text_pipeline().save_pretrained(tmp_path / "self")
    with pytest.raises(ValueError, match="is the folder"):
        save_extension(tmp_path / "self", ".", {"controlnet": cn})
    # folders edited by hand: one naming itself, two naming each other
    index = {"_class_name": "TextToImagePipeline", "_fastdiff_version": fastdiff.__version__, "settings": {},
             "controlnet": ["fastdiff", "ControlNet"]}
    (tmp_path / "me").mkdir()
    (tmp_path / "me" / INDEX_NAME).write_text(json.dumps({**index, "base_model": "."}))
    with pytest.raises(ValueError, match="loops back"):
        fastdiff.load(tmp_path / "me")
    for a, b in (("a", "b"), ("b", "a")):
        (tmp_path / a).mkdir()
        (tmp_path / a / INDEX_NAME).write_text(json.dumps({**index, "base_model": f"../{b}"}))
    with pytest.raises(ValueError, match="loops back"):
        fastdiff.load(tmp_path / "a")
    with pytest.raises(ValueError, match="loops back"):
        hub.model_settings(tmp_path / "a")
    with pytest.raises(ValueError, match="loops back"):  # saving into a folder its base leads back to
        save_extension(tmp_path / "b", "../a", {"controlnet": cn})


def test_save_extension_checks_its_arguments_before_writing(tmp_path, pipe):
    tiny_text_pipeline().save_pretrained(tmp_path / "base")
    out = tmp_path / "out"
    cases = [
        (dict(base_model="", components={"controlnet": pipe.controlnet}), TypeError, "base_model"),
        (dict(base_model="../base", components={}), TypeError, "components"),
        (dict(base_model="../base", components={"adapter": pipe.controlnet}), ValueError, "'adapter'"),
        (dict(base_model="../base", components={"controlnet": object()}), TypeError, "components['controlnet']"),
        (dict(base_model="../base", components={"controlnet": pipe.controlnet}, settings={"x": object()}),
         ValueError, "JSON"),
        (dict(base_model="../nowhere", components={"controlnet": pipe.controlnet}), ValueError, "neither"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error) as info:
            save_extension(out, **kwargs)
        assert message in str(info.value)
        assert not out.exists()


# --------------------------------------------------------------------------------------------- 6. CUDA graphs (faked)
def check_graphed_steps(pipe, cache, model, x, context, eps_fn, guidance: float = 3.0):
    """Run ``model`` through the graph ``cache`` (the UNet call and the fused guided DDIM step as one graph) at every
    timestep of the pipeline's scheduler, on the batch [x; x] and ``context``, and compare each step with the plan
    applied eagerly to ``eps_fn(model_in, t_batch)``."""
    cache.check(model)
    for t in pipe.scheduler.timesteps.tolist():
        model_in, t_batch = torch.cat([x, x]), torch.full((2 * x.shape[0],), float(t))
        plan = pipe.scheduler.fused_step(t, x)
        got = cache.run_step(model, plan, guidance, model_in, t_batch, None, context, x)
        close(got, plan.run(x, eps_fn(model_in, t_batch), guidance)[0], atol=1e-5)


def test_cuda_graphs_capture_the_controlled_step_once(fake_cuda, pipe):  # noqa: F811 (the fixture)
    """The wrapper is one model for the graph cache: captured once, then replayed with a new control map and scale
    (static buffers filled in place); guess mode is its own wrapper (another graph); a new ControlNet is noticed by
    the fingerprint check and captured again."""
    sched, cache = pipe.scheduler, GraphCache(8)
    sched.set_timesteps(3)
    x = noise(2)
    context = torch.cat([encode(pipe, ["", ""]), encode(pipe, [P0, P1])])
    maps = {"a": edge_maps(2, seed=5), "b": edge_maps(2, seed=6)}

    def run_steps(name, scale, guess=False):
        def eps(model_in, t_batch):
            control = maps[name] if guess else torch.cat([maps[name], maps[name]])
            sub = slice(2, None) if guess else slice(None)
            down, mid = pipe.controlnet(model_in[sub], t_batch[sub], control, conditioning_scale=scale,
                                        context=context[sub], guess_mode=guess)
            if guess:
                down = [torch.cat([torch.zeros_like(r), r]) for r in down]
                mid = torch.cat([torch.zeros_like(mid), mid])
            return pipe.unet(model_in, t_batch, context=context, down_block_additional_residuals=down,
                             mid_block_additional_residual=mid)

        with torch.inference_mode():
            pipe._control = (maps[name], scale, guess)
            model = pipe._denoiser(pipe.unet, True)
            check_graphed_steps(pipe, cache, model, x, context, eps)
            pipe._control = None
            return model

    first = run_steps("a", 1.0)
    ptr = first._cond.data_ptr(), first._scales.data_ptr()
    assert run_steps("b", 0.5) is first and (first._cond.data_ptr(), first._scales.data_ptr()) == ptr
    assert cache.captures == 1 and cache.replays == 6
    guessing = run_steps("a", 0.8, guess=True)
    assert guessing is not first and guessing.split and cache.captures == 2
    pipe.controlnet = make_controlnet(pipe.unet, seed=9)  # a new ControlNet: the same wrapper, captured again
    assert run_steps("b", 1.0) is first and first.controlnet is pipe.controlnet
    assert cache.captures == 3 and len(cache) == 2


def test_the_wrapper_has_the_unets_signature_and_config(pipe):
    model = ControlledUNet(pipe.unet, pipe.controlnet)
    assert model.config is pipe.unet.config
    with pytest.raises(RuntimeError, match="set_control"):
        model(noise(1), 10.0, context=encode(pipe, [P0]))


# --------------------------------------------------------------------------------------------- 7. fastdiff sample
@pytest.fixture(scope="module")
def cli_models(tmp_path_factory):
    """A tiny text model folder, a ControlNet extension folder on it, and an edge map PNG (32×32 RGB: resized and
    made gray)."""
    root = tmp_path_factory.mktemp("models")
    base = tiny_text_pipeline(seed=0)
    base.save_pretrained(root / "tiny-text")
    save_extension(root / "tiny-controlnet", "../tiny-text", {"controlnet": make_controlnet(base.unet)})
    edge = (edge_maps(1, size=32)[0, 0].numpy() * 255).astype(np.uint8)
    Image.fromarray(np.stack([edge] * 3, -1), mode="RGB").save(root / "edge.png")
    (root / "not-a-png.png").write_text("hello")
    return root


def test_sample_control_writes_a_png(tmp_path, cli_models):
    out, zero, plain = tmp_path / "c.png", tmp_path / "zero.png", tmp_path / "plain.png"
    common = ["--prompt", "4", "--num", "4", "--dtype", "fp32"]
    res = run("sample", "--model", str(cli_models / "tiny-controlnet"), *common, "--control",
              str(cli_models / "edge.png"), "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert str(out) in res.stdout and "control" in res.stdout
    with Image.open(out) as im:
        assert im.format == "PNG" and im.mode == "L" and im.size == (2 * 18 + 2, 2 * 18 + 2)
    for model, extra, path in (("tiny-controlnet", ["--control", str(cli_models / "edge.png"), "--control-scale",
                                                   "0"], zero), ("tiny-text", [], plain)):
        res = run("sample", "--model", str(cli_models / model), *common, *extra, "--out", str(path))
        assert res.returncode == 0, res.stderr
    # scale 0 is the base model; scale 1 is not
    assert zero.read_bytes() == plain.read_bytes() and out.read_bytes() != plain.read_bytes()


@pytest.mark.parametrize("case, model, args, message", [
    ("model without a ControlNet", "tiny-text", ["--control", "edge.png"], "--control: model"),
    ("scale without control", "tiny-controlnet", ["--control-scale", "0.5"], "--control-scale needs --control"),
    ("missing file", "tiny-controlnet", ["--control", "missing.png"], "no such file"),
    ("not an image", "tiny-controlnet", ["--control", "not-a-png.png"], "not a readable image"),
    ("nan scale", "tiny-controlnet", ["--control", "edge.png", "--control-scale", "nan"],
     "--control-scale must be a finite number"),
])
def test_control_usage_errors_are_one_line_exit_2_nothing_written(tmp_path, cli_models, case, model, args, message):
    args = [str(cli_models / a) if a.endswith(".png") else a for a in args]
    res = run("sample", "--model", str(cli_models / model), "--prompt", "4", "--num", "2", *args, "--out",
              str(tmp_path / "x.png"), cwd=tmp_path)
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("fastdiff: error: "), res.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_sample_help_mentions_the_control_flags():
    res = run("sample", "--help")
    assert res.returncode == 0 and "--control PNG" in res.stdout and "--control-scale S" in res.stdout


# --------------------------------------------------------------------------------------------- 8. compile()
def test_compiled_unet_with_an_eager_controlnet_matches_eager(pipe):
    """After compile() the wrapper runs the compiled UNet (with the residuals as inputs) and the ControlNet eagerly."""
    latents, control = noise(2), edge_maps(2)
    eager = sample(pipe, prompt=[P0, P1], latents=latents, image=control)
    plain = sample(pipe, prompt=[P0, P1], latents=latents)
    pipe.compile(freeze=False, backend="aot_eager")
    close(sample(pipe, prompt=[P0, P1], latents=latents, image=control), eager, atol=1e-5)
    close(sample(pipe, prompt=[P0, P1], latents=latents), plain, atol=1e-5)
    assert pipe._compiled.compiles == 1  # one compiled UNet for both (no compile again when switching)
