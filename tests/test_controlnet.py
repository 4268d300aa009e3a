"""ControlNet (fastdiff.models.ControlNet) and the UNet's residual inputs: residual shapes per skip state, weights
copied by from_unet, zero convolutions (a fresh ControlNet changes nothing, exactly), conditioning_scale and guess
mode, the UNet's residual addition against hooks on its blocks, parity with diffusers' ControlNetModel (both ways, and
UNet + ControlNet against UNet2DConditionModel + ControlNetModel), checkpoints, and bad inputs.

Tests that need diffusers skip themselves without it.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from utils import assert_rel_close

import fastdiff
from fastdiff import interop
from fastdiff.interop.diffusers_config import diffusers_config
from fastdiff.models import ControlNet, ControlNetConfig, UNet, load_model, registered_models
from fastdiff.models.unet import skip_layout

TOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)


def dm():
    return pytest.importorskip("diffusers")


# --------------------------------------------------------------------------------------------- tiny models
def pixel_unet(**overrides):
    """Class-conditional 16×16 grayscale pixel UNet, self-attention at level 1: 1 + 2·1 + 1 = 4 skip states."""
    torch.manual_seed(0)
    kwargs = dict(in_channels=1, out_channels=1, base_channels=8, channel_mult=(1, 2), layers_per_block=1,
                  attention_levels=(1,), norm_num_groups=4, attention_head_dim=8, num_classes=10)
    return UNet(**{**kwargs, **overrides}).eval()


def latent_unet(**overrides):
    """Cross-attention 2×8×8 latent UNet, three levels, two heads: 1 + 3·1 + 2 = 6 skip states."""
    torch.manual_seed(0)
    kwargs = dict(in_channels=2, out_channels=2, base_channels=8, channel_mult=(1, 2, 2), layers_per_block=1,
                  attention_levels=(0, 1), norm_num_groups=4, num_attention_heads=2, context_dim=6)
    return UNet(**{**kwargs, **overrides}).eval()


CASES = {
    # name: (unet factory, ControlNet options, batch inputs: x shape, control map shape, context, labels)
    "pixel-classes": (pixel_unet, dict(conditioning_embedding_out_channels=(8,)), (2, 1, 16, 16), (2, 1, 16, 16),
                      False, True),
    "latent-context": (latent_unet, dict(), (2, 2, 8, 8), (2, 1, 16, 16), True, False),
}


def make(name: str, seed: int = 0):
    """(unet, controlnet from it, inputs dict) for a case; inputs drawn from ``seed``."""
    factory, options, x_shape, cond_shape, context, labels = CASES[name]
    unet = factory()
    torch.manual_seed(1)
    controlnet = ControlNet.from_unet(unet, **options)
    g = torch.Generator().manual_seed(seed)
    inputs = {"x": torch.randn(x_shape, generator=g), "t": torch.tensor([10, 700]),
              "cond": torch.rand(cond_shape, generator=g)}
    inputs["kwargs"] = {}
    if context:
        inputs["kwargs"]["context"] = torch.randn(x_shape[0], 5, 6, generator=g)
    if labels:
        inputs["kwargs"]["class_labels"] = torch.tensor([3, 10])  # a digit and the null class
    return unet, controlnet, inputs


ZERO_INIT = ("controlnet_cond_embedding.conv_out.", "controlnet_down_blocks.", "controlnet_mid_block.")


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 5, std: float = 0.3) -> torch.nn.Module:
    """Random values in the zero-initialised convolutions (same names in fastdiff's and diffusers' ControlNets)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.startswith(ZERO_INIT):
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@torch.no_grad()
def residuals(controlnet, inputs, **kwargs):
    return controlnet(inputs["x"], inputs["t"], inputs["cond"], **kwargs, **inputs["kwargs"])


@torch.no_grad()
def unet_skips(unet, inputs):
    """The skip states the UNet's up path reads (a pre-hook on the first up block) and the middle block's output."""
    seen = {}
    hooks = [unet.up_blocks[0].register_forward_pre_hook(lambda m, a: seen.update(skips=[s.clone() for s in a[1]])),
             unet.mid_block.register_forward_hook(lambda m, a, out: seen.update(mid=out.clone()))]
    try:
        unet(inputs["x"], inputs["t"], **inputs["kwargs"])
    finally:
        for h in hooks:
            h.remove()
    return seen["skips"], seen["mid"]


# --------------------------------------------------------------------------------------------- shapes and weights
@pytest.mark.parametrize("name", list(CASES))
def test_one_residual_per_skip_state_with_its_shape(name):
    unet, controlnet, inputs = make(name)
    skips, mid = unet_skips(unet, inputs)
    down, mid_res = residuals(perturb(controlnet), inputs)
    assert isinstance(down, tuple) and len(down) == len(skips) == len(skip_layout(unet.config))
    assert len(controlnet.controlnet_down_blocks) == len(skips)
    assert [r.shape for r in down] == [s.shape for s in skips]
    assert mid_res.shape == mid.shape
    assert all(r.abs().sum() > 0 for r in down) and mid_res.abs().sum() > 0


def test_global_pool_conditions_gives_pooled_residuals():
    unet, _, inputs = make("latent-context")
    torch.manual_seed(1)
    pooled = perturb(ControlNet.from_unet(unet, global_pool_conditions=True)).eval()
    full = ControlNet.from_unet(unet, global_pool_conditions=False).eval()
    full.load_state_dict(pooled.state_dict())
    down, mid = residuals(pooled, inputs)
    ref_down, ref_mid = residuals(full, inputs)
    for r, ref in zip(down, ref_down):
        assert r.shape == ref.shape[:2] + (1, 1)
        assert_rel_close(r, ref.mean(dim=(2, 3), keepdim=True), 1e-6, "pooled residual")
    assert_rel_close(mid, ref_mid.mean(dim=(2, 3), keepdim=True), 1e-6, "pooled mid residual")
    # guess mode does nothing when pooling (as diffusers)
    assert all(torch.equal(a, b) for a, b in zip(residuals(pooled, inputs, guess_mode=True)[0], down))
    with torch.no_grad():  # a pooled residual broadcasts over the skip state in the UNet
        out = unet(inputs["x"], inputs["t"], down_block_additional_residuals=down, mid_block_additional_residual=mid,
                   **inputs["kwargs"])
    assert out.shape == inputs["x"].shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(CASES))
def test_from_unet_copies_the_encoder(name):
    unet, controlnet, _ = make(name)
    assert controlnet.config == ControlNetConfig.from_unet_config(unet.config, **CASES[name][1])
    theirs = unet.state_dict()
    copied = [k for k in controlnet.state_dict() if k.startswith(("conv_in.", "time_embedding.", "class_embedding.",
                                                                  "down_blocks.", "mid_block."))]
    assert len(copied) > 20 and any(k.startswith("down_blocks.1.attentions") for k in copied)
    for key in copied:
        assert torch.equal(controlnet.state_dict()[key], theirs[key]), key
    assert ("class_embedding.weight" in copied) == (unet.config.num_classes is not None)
    assert not controlnet.training  # the UNet's mode
    for name_, p in controlnet.named_parameters():
        if name_.startswith(ZERO_INIT):
            assert not p.any(), name_


def test_from_unet_dtype_guidance_and_no_copy():
    unet = latent_unet(guidance_embedding_dim=8).to(torch.bfloat16).train()
    controlnet = ControlNet.from_unet(unet, conditioning_channels=3)
    assert next(controlnet.parameters()).dtype == torch.bfloat16 and controlnet.training
    assert controlnet.time_embedding.cond_proj is None  # a ControlNet's time embedding takes no guidance
    assert torch.equal(controlnet.time_embedding.linear_1.weight, unet.time_embedding.linear_1.weight)
    torch.manual_seed(3)
    fresh = ControlNet.from_unet(latent_unet(), load_weights_from_unet=False)
    assert not torch.equal(fresh.conv_in.weight, latent_unet().conv_in.weight)
    with pytest.raises(TypeError, match="unet must be a fastdiff UNet"):
        ControlNet.from_unet(controlnet)
    with pytest.raises(ValueError, match="unknown ControlNet option"):
        ControlNetConfig.from_unet_config(unet.config, in_channels=3)


# --------------------------------------------------------------------------------------------- zero convs and scales
@pytest.mark.parametrize("name", list(CASES))
def test_fresh_controlnet_changes_nothing_exactly(name):
    unet, controlnet, inputs = make(name)
    down, mid = residuals(controlnet, inputs)
    assert all(not r.any() for r in down) and not mid.any()
    with torch.no_grad():
        base = unet(inputs["x"], inputs["t"], **inputs["kwargs"])
        out = unet(inputs["x"], inputs["t"], down_block_additional_residuals=down, mid_block_additional_residual=mid,
                   **inputs["kwargs"])
    assert torch.equal(out, base)


@pytest.mark.parametrize("name", list(CASES))
def test_conditioning_scale(name):
    unet, controlnet, inputs = make(name)
    perturb(controlnet)
    down1, mid1 = residuals(controlnet, inputs)
    down0, mid0 = residuals(controlnet, inputs, conditioning_scale=0.0)
    assert all(not r.any() for r in down0) and not mid0.any()
    with torch.no_grad():
        base = unet(inputs["x"], inputs["t"], **inputs["kwargs"])
        off = unet(inputs["x"], inputs["t"], down_block_additional_residuals=down0, mid_block_additional_residual=mid0,
                   **inputs["kwargs"])
        on = unet(inputs["x"], inputs["t"], down_block_additional_residuals=down1, mid_block_additional_residual=mid1,
                  **inputs["kwargs"])
    assert torch.equal(off, base)
    assert (on - base).abs().max() > 1e-3  # the control does something
    for s in (0.5, -1.25, 2):
        down_s, mid_s = residuals(controlnet, inputs, conditioning_scale=s)
        for r, r1 in zip(down_s + (mid_s,), down1 + (mid1,)):
            assert torch.equal(r, r1 * s)


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_guess_mode_scales(scale):
    unet, controlnet, inputs = make("latent-context")
    perturb(controlnet)
    down1, mid1 = residuals(controlnet, inputs)
    down, mid = residuals(controlnet, inputs, conditioning_scale=scale, guess_mode=True)
    n = len(down1)
    expected = [10.0 ** (-1 + i / n) * scale for i in range(n + 1)]  # 0.1 … 1.0, geometric, n + 1 of them
    assert math.isclose(expected[0], 0.1 * scale) and math.isclose(expected[-1], scale)
    for i, (r, r1) in enumerate(zip(down + (mid,), down1 + (mid1,))):
        assert_rel_close(r, r1 * expected[i], 1e-6, f"guess-mode residual {i}")


def test_fused_matches_reference(monkeypatch):
    """GroupNorm+SiLU and attention go through fastdiff's ops: the Triton kernels (interpreted on CPU) run and match
    the reference path."""
    _, controlnet, inputs = make("latent-context")
    perturb(controlnet)
    one = {"x": inputs["x"][:1], "t": inputs["t"][:1], "cond": inputs["cond"][:1],
           "kwargs": {"context": inputs["kwargs"]["context"][:1]}}  # batch 1: the interpreter's time grows with it
    monkeypatch.setenv("FASTDIFF_BACKEND", "torch")
    ref_down, ref_mid = residuals(controlnet, one)
    monkeypatch.setenv("FASTDIFF_BACKEND", "auto")
    fastdiff.reset_counts()
    down, mid = residuals(controlnet, one)
    counts = fastdiff.counts()
    for op in ("group_norm_silu", "attention"):
        assert counts.get((op, "interpreter"), 0) > 0 and counts.get((op, "torch"), 0) == 0, (op, counts)
    for k, (a, b) in enumerate(zip(down + (mid,), ref_down + (ref_mid,))):
        assert_rel_close(a, b, 1e-4, f"residual {k}, interpreter vs reference")


# --------------------------------------------------------------------------------------------- the UNet's residuals
def test_unet_adds_residuals_where_the_up_path_reads_them():
    unet, _, inputs = make("latent-context")
    skips, mid = unet_skips(unet, inputs)
    g = torch.Generator().manual_seed(7)
    down_r = [torch.randn(s.shape, generator=g) for s in skips]
    mid_r = torch.randn(mid.shape, generator=g)
    # the states the up path reads are the base states plus the residuals
    seen = {}
    hooks = [unet.up_blocks[0].register_forward_pre_hook(lambda m, a: seen.update(skips=[s.clone() for s in a[1]])),
             unet.mid_block.register_forward_hook(lambda m, a, out: seen.update(mid=out.clone()))]
    with torch.no_grad():
        out = unet(inputs["x"], inputs["t"], down_block_additional_residuals=down_r,
                   mid_block_additional_residual=mid_r, **inputs["kwargs"])
    for h in hooks:
        h.remove()
    assert all(torch.equal(a, s + r) for a, s, r in zip(seen["skips"], skips, down_r))
    assert torch.equal(seen["mid"], mid)  # the middle block itself is unchanged: its residual is added after it
    # the hand reference: hooks add the residuals to the skips the up path gets and to the middle block's output
    hooks = [unet.up_blocks[0].register_forward_pre_hook(
                 lambda m, a: a[1].__setitem__(slice(None), [s + r for s, r in zip(a[1], down_r)])),
             unet.mid_block.register_forward_hook(lambda m, a, o: o + mid_r)]
    with torch.no_grad():
        ref = unet(inputs["x"], inputs["t"], **inputs["kwargs"])
    for h in hooks:
        h.remove()
    assert torch.equal(out, ref)
    with torch.no_grad():  # either residual alone
        only_mid = unet(inputs["x"], inputs["t"], mid_block_additional_residual=mid_r, **inputs["kwargs"])
        only_down = unet(inputs["x"], inputs["t"], down_block_additional_residuals=tuple(down_r), **inputs["kwargs"])
        base = unet(inputs["x"], inputs["t"], **inputs["kwargs"])
    assert not torch.equal(only_mid, base) and not torch.equal(only_down, base)


# --------------------------------------------------------------------------------------------- diffusers parity
COND = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=6)
DIFFUSERS_CASES = {
    "heads-2-classes": dict(COND, in_channels=3, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                            attention_head_dim=2, num_class_embeds=4, conditioning_channels=1,
                            conditioning_embedding_out_channels=(4, 8)),
    "linear-proj-three-stages-rgb": dict(COND, in_channels=4, layers_per_block=2,
                                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                         attention_head_dim=(1, 2), use_linear_projection=True, flip_sin_to_cos=False,
                                         freq_shift=1, conditioning_embedding_out_channels=(4, 4, 8)),
    "global-pool": dict(COND, in_channels=2, down_block_types=("CrossAttnDownBlock2D",) * 2, attention_head_dim=4,
                        conditioning_channels=1, conditioning_embedding_out_channels=(8,),
                        global_pool_conditions=True),
}


def build_diffusers_controlnet(name: str):
    torch.manual_seed(0)
    return perturb(dm().ControlNetModel(**DIFFUSERS_CASES[name]).eval())


def diffusers_inputs(cfg, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    f = 2 ** (len(cfg.conditioning_embedding_out_channels) - 1)
    inputs = {"x": torch.randn(2, cfg.in_channels, 8, 8, generator=g), "t": torch.tensor([10, 900]),
              "cond": torch.rand(2, cfg.conditioning_channels, 8 * f, 8 * f, generator=g),
              "context": torch.randn(2, 5, cfg.cross_attention_dim, generator=g), "labels": None}
    if cfg.num_class_embeds:
        inputs["labels"] = torch.tensor([0, cfg.num_class_embeds - 1])
    return inputs


@torch.no_grad()
def both_outputs(theirs, ours, **kwargs):
    i = diffusers_inputs(theirs.config)
    ref = theirs(i["x"], i["t"], i["context"], i["cond"], class_labels=i["labels"], return_dict=False, **kwargs)
    out = ours(i["x"], i["t"], i["cond"], class_labels=i["labels"], context=i["context"], **kwargs)
    return ref, out


def assert_same_residuals(ref, out, what):
    (ref_down, ref_mid), (down, mid) = ref, out
    assert len(down) == len(ref_down), what
    for k, (a, b) in enumerate(zip(down, ref_down)):
        assert_rel_close(a, b, TOL, f"{what}: down residual {k}")
    assert_rel_close(mid, ref_mid, TOL, f"{what}: mid residual")
    assert mid.std() > 0.01 or mid.shape[2:] == (1, 1)


@pytest.mark.parametrize("name", list(DIFFUSERS_CASES))
def test_parity_from_diffusers(name, tmp_path):
    theirs = build_diffusers_controlnet(name)
    theirs.save_pretrained(tmp_path)
    for ours in (fastdiff.from_diffusers(tmp_path), fastdiff.from_diffusers(theirs)):
        assert type(ours) is ControlNet and not ours.training
        state = ours.state_dict()
        for key, ref in theirs.state_dict().items():
            assert torch.equal(state[key.replace(".to_out.0.", ".to_out.")], ref), key
        for kwargs in ({}, {"conditioning_scale": 0.7}, {"conditioning_scale": 0.5, "guess_mode": True}):
            assert_same_residuals(*both_outputs(theirs, ours, **kwargs), f"{name} {kwargs}")


def fastdiff_controlnet():
    unet = latent_unet(num_classes=3, attention_levels=(1,), num_attention_heads=None, attention_head_dim=4)
    torch.manual_seed(2)
    return perturb(ControlNet.from_unet(unet, conditioning_channels=2, conditioning_embedding_out_channels=(4, 8)))


def test_to_diffusers_parity_and_exact_round_trip():
    diffusers = dm()
    ours = fastdiff_controlnet()
    theirs = fastdiff.to_diffusers(ours)
    assert type(theirs) is diffusers.ControlNetModel and not theirs.training
    for kwargs in ({}, {"conditioning_scale": 1.5, "guess_mode": True}):
        assert_same_residuals(*both_outputs(theirs, ours, **kwargs), f"to_diffusers {kwargs}")
    back = fastdiff.from_diffusers(theirs)
    assert back.config.channels == ours.config.channels
    different = {k for k, v in vars(back.config).items() if getattr(ours.config, k) != v}
    assert different <= {"base_channels", "channel_mult", "block_out_channels"}, different
    assert list(back.state_dict()) == list(ours.state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_unet_with_controlnet_matches_diffusers():
    """diffusers' UNet2DConditionModel + ControlNetModel.from_unet, both converted: the residuals, the UNet output
    with them, and fastdiff's own from_unet giving the same ControlNet config and encoder weights."""
    diffusers = dm()
    torch.manual_seed(0)
    their_unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=6, attention_head_dim=2).eval()
    their_cn = perturb(diffusers.ControlNetModel.from_unet(their_unet, conditioning_embedding_out_channels=(4, 8),
                                                           conditioning_channels=1).eval())
    unet, controlnet = fastdiff.from_diffusers(their_unet), fastdiff.from_diffusers(their_cn)
    own = ControlNet.from_unet(unet, conditioning_channels=1, conditioning_embedding_out_channels=(4, 8))
    assert own.config == controlnet.config
    for key, value in own.state_dict().items():
        if not key.startswith(("controlnet_",)):
            assert torch.equal(value, controlnet.state_dict()[key]), key
    i = diffusers_inputs(their_cn.config)
    with torch.no_grad():
        ref_down, ref_mid = their_cn(i["x"], i["t"], i["context"], i["cond"], conditioning_scale=0.8,
                                     return_dict=False)
        ref = their_unet(i["x"], i["t"], i["context"], down_block_additional_residuals=ref_down,
                         mid_block_additional_residual=ref_mid).sample
        base = their_unet(i["x"], i["t"], i["context"]).sample
        down, mid = controlnet(i["x"], i["t"], i["cond"], 0.8, context=i["context"])
        out = unet(i["x"], i["t"], context=i["context"], down_block_additional_residuals=down,
                   mid_block_additional_residual=mid)
    assert_same_residuals((ref_down, ref_mid), (down, mid), "from_unet ControlNet")
    assert_rel_close(out, ref, TOL, "UNet with ControlNet residuals vs diffusers")
    assert (ref - base).abs().max() > 1e-3


def test_controlnet_configs_diffusers_cannot_express_or_fastdiff_cannot_read(tmp_path):
    _, pixel, _ = make("pixel-classes")
    with pytest.raises(ValueError, match="no context_dim.*no diffusers equivalent"):
        diffusers_config(pixel)
    with pytest.raises(ValueError, match="mid_attention=False"):
        diffusers_config(ControlNet.from_unet(latent_unet(mid_attention=False)))
    base = {"_class_name": "ControlNetModel", **{k: list(v) if isinstance(v, tuple) else v
                                                 for k, v in DIFFUSERS_CASES["heads-2-classes"].items()}}
    for changes, pattern in [
        ({"controlnet_conditioning_channel_order": "bgr", "mid_block_type": "UNetMidBlock2D"},
         r"controlnet_conditioning_channel_order='bgr' \(supported: 'rgb'\); mid_block_type='UNetMidBlock2D'"),
        ({"conditioning_embedding_out_channels": None, "down_block_types": ["AttnDownBlock2D", "DownBlock2D"]},
         r"conditioning_embedding_out_channels=None.*down_block_types\[0\]='AttnDownBlock2D'"),
        ({"transformer_layers_per_block": 2}, r"transformer_layers_per_block=2 \(supported: 1"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps({**base, **changes}))  # no weights: rejected before reading
        with pytest.raises(ValueError, match=pattern) as info:
            fastdiff.from_diffusers(tmp_path)
        assert "cannot convert diffusers ControlNetModel" in str(info.value) and "Supported:" in str(info.value)
    model_class, config = interop.convert_config("ControlNetModel", {"cross_attention_dim": 768})  # SD 1.5's
    assert model_class is ControlNet and config.conditioning_embedding_out_channels == (16, 32, 96, 256)
    assert (config.conditioning_channels, config.num_attention_heads, config.attention_levels) == (3, 8, (0, 1, 2))


# --------------------------------------------------------------------------------------------- checkpoints
def test_save_and_load_round_trip(tmp_path):
    unet, controlnet, inputs = make("pixel-classes")
    perturb(controlnet)
    controlnet.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "ControlNet"
    assert registered_models()["ControlNet"] is ControlNet
    for loaded in (ControlNet.from_pretrained(tmp_path), load_model(tmp_path)):
        assert type(loaded) is ControlNet and loaded.config == controlnet.config
        for key, value in controlnet.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
        (down, mid), (ref_down, ref_mid) = residuals(loaded, inputs), residuals(controlnet, inputs)
        assert all(torch.equal(a, b) for a, b in zip(down, ref_down)) and torch.equal(mid, ref_mid)
    with pytest.raises(ValueError, match="holds a 'ControlNet', not a 'UNet'"):
        UNet.from_pretrained(tmp_path)


# --------------------------------------------------------------------------------------------- bad inputs
def test_bad_controlnet_inputs_name_the_argument():
    _, controlnet, inputs = make("latent-context")
    x, t, cond, kw = inputs["x"], inputs["t"], inputs["cond"], inputs["kwargs"]
    cases = [
        (dict(controlnet_cond=cond.repeat(1, 3, 1, 1)), ValueError, r"must have shape \(2, 1, 16, 16\) \(B, cond"),
        (dict(controlnet_cond=cond[..., :8, :8]), ValueError, r"controlnet_cond must have shape .*H·2, W·2"),
        (dict(controlnet_cond=cond[:1]), ValueError, "controlnet_cond must have shape"),
        (dict(controlnet_cond=cond.long()), TypeError, "controlnet_cond must be a floating torch.Tensor"),
        (dict(controlnet_cond=cond.numpy()), TypeError, "controlnet_cond must be a floating torch.Tensor"),
        (dict(conditioning_scale="0.5"), TypeError, "conditioning_scale must be a real number"),
        (dict(conditioning_scale=torch.tensor(0.5)), TypeError, "conditioning_scale must be a real number"),
        (dict(conditioning_scale=True), TypeError, "conditioning_scale must be a real number"),
        (dict(conditioning_scale=float("nan")), ValueError, "conditioning_scale must be finite"),
        (dict(guess_mode=1), TypeError, "guess_mode must be a bool"),
        (dict(context=None), ValueError, "this ControlNet cross-attends to a context"),
        (dict(class_labels=torch.tensor([0, 1])), ValueError, "class_labels were given to an unconditional ControlNet"),
        (dict(x=x[:, :1]), ValueError, "x has 1 channels, the ControlNet expects in_channels=2"),
    ]
    for change, error, pattern in cases:
        args = {"x": x, "t": t, "controlnet_cond": cond, **kw, **change}
        with pytest.raises(error, match=pattern):
            controlnet(**args)


def test_bad_controlnet_configs():
    with pytest.raises(TypeError, match="conditioning_channels must be an integer"):
        ControlNetConfig(conditioning_channels=1.5)
    with pytest.raises(ValueError, match="conditioning_channels must be ≥ 1"):
        ControlNetConfig(conditioning_channels=0)
    with pytest.raises(ValueError, match="conditioning_embedding_out_channels must hold at least one"):
        ControlNetConfig(conditioning_embedding_out_channels=())
    with pytest.raises(ValueError, match=r"conditioning_embedding_out_channels\[1\] must be ≥ 1"):
        ControlNetConfig(conditioning_embedding_out_channels=(4, 0))
    with pytest.raises(ValueError, match="invalid ControlNetConfig: norm_num_groups=3 must divide"):
        ControlNetConfig(block_out_channels=(8, 16), norm_num_groups=3)


def test_bad_unet_residuals_name_the_argument():
    unet, _, inputs = make("latent-context")
    skips, mid = unet_skips(unet, inputs)
    down = [torch.zeros(s.shape) for s in skips]
    mid_r = torch.zeros(mid.shape)
    cases = [
        (dict(down_block_additional_residuals=down[:-1]), ValueError,
         "down_block_additional_residuals has 5 tensors, this UNet has 6 skip states"),
        (dict(down_block_additional_residuals=down[0]), TypeError,
         "down_block_additional_residuals must be a tuple or list of 6 tensors"),
        (dict(down_block_additional_residuals=down[:2] + [down[3]] + down[3:]), ValueError,
         r"down_block_additional_residuals\[2\] must have shape \(2, 8, 4, 4\)"),
        (dict(down_block_additional_residuals=down[:5] + [None]), TypeError,
         r"down_block_additional_residuals\[5\] must be a floating torch.Tensor, got NoneType"),
        (dict(down_block_additional_residuals=down[:5] + [down[5].long()]), TypeError,
         r"down_block_additional_residuals\[5\] must be a floating torch.Tensor, got a torch.int64 tensor"),
        (dict(mid_block_additional_residual=mid_r[:, :8]), ValueError,
         r"mid_block_additional_residual must have shape \(2, 16, 2, 2\)"),
        (dict(mid_block_additional_residual=[mid_r]), TypeError, "mid_block_additional_residual must be a floating"),
    ]
    for change, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            unet(inputs["x"], inputs["t"], **inputs["kwargs"], **change)
