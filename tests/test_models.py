"""fastdiff.models: output shapes, gradients, determinism, input errors, and fused (Triton interpreter) vs reference
on whole models. Tiny configs only (8–16 channels, 8×8 / 16×16 inputs)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from model_factories import CASES, build, case_params, make_inputs, needs_vq, run
from utils import assert_rel_close

import fastdiff
from fastdiff import dispatch
from fastdiff.models import (
    VAE,
    VQVAE,
    AutoencoderKL,
    AutoencoderKLConfig,
    DCGANConfig,
    DCGANDiscriminator,
    DCGANGenerator,
    StyleGenerator,
    StyleGeneratorConfig,
    UNet,
    UNetConfig,
    VAEConfig,
    VQVAEConfig,
)
from fastdiff.models.classifier import DigitClassifierConfig

ALL = case_params()


# --------------------------------------------------------------------------------------------- every model
@pytest.mark.parametrize("name", ALL)
def test_output_shapes(name):
    model = build(name).eval()
    with torch.no_grad():
        outs = run(model, make_inputs(name, model))
    assert tuple(tuple(o.shape) for o in outs) == CASES[name].shapes
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize("name", ALL)
def test_gradients_reach_every_parameter(name):
    model = build(name).train()
    outs = run(model, make_inputs(name, model))
    loss = sum(o.float().square().mean() for o in outs)
    loss.backward()
    for pname, p in model.named_parameters():
        if not p.requires_grad:  # e.g. an EMA codebook
            continue
        assert p.grad is not None, f"{name}: no gradient reached {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient in {pname}"
        assert p.grad.abs().sum() > 0, f"{name}: gradient of {pname} is all zero"


@pytest.mark.parametrize("name", ALL)
def test_deterministic_under_fixed_seed(name):
    a, b = build(name, seed=7).eval(), build(name, seed=7).eval()
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), f"{name}: {ka} differs between two builds with one seed"
    with torch.no_grad():
        out_a, out_b = run(a, make_inputs(name, a, seed=3)), run(b, make_inputs(name, b, seed=3))
    for x, y in zip(out_a, out_b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("name", ALL)
def test_fused_matches_reference(name, monkeypatch):
    """The Triton kernels (interpreted on CPU) and the reference path give the same model output (fp32)."""
    model = build(name).eval()
    with torch.inference_mode():
        monkeypatch.setenv("FASTDIFF_BACKEND", "torch")
        ref = run(model, make_inputs(name, model, batch=1))  # batch 1: the interpreter's time grows with the grid
        monkeypatch.setenv("FASTDIFF_BACKEND", "auto")
        fastdiff.reset_counts()
        out = run(model, make_inputs(name, model, batch=1))
    counts = fastdiff.counts()
    for i, (o, r) in enumerate(zip(out, ref)):
        assert_rel_close(o, r, 1e-4, what=f"{name} output {i}")
    if CASES[name].fused:
        for op in ("group_norm_silu", "attention"):
            assert counts.get((op, "interpreter"), 0) > 0, f"{name}: {op} did not run the Triton interpreter: {counts}"
            assert counts.get((op, "torch"), 0) == 0, f"{name}: {op} fell back to the reference: {counts}"
    if CASES[name].vq and dispatch.select("vq_nearest", torch.device("cpu")) != "torch":
        assert any(op == "vq_nearest" and path != "torch" for op, path in counts), f"vq_nearest path: {counts}"


def test_fused_unet_channels_last(monkeypatch):
    """The kernels take channels_last activations as they come (no copies) and still match the reference."""
    model = build("unet_cond").eval().to(memory_format=torch.channels_last)
    args, kwargs = make_inputs("unet_cond", model, batch=1)
    args = (args[0].to(memory_format=torch.channels_last), *args[1:])
    with torch.inference_mode():
        monkeypatch.setenv("FASTDIFF_BACKEND", "torch")
        ref = model(*args, **kwargs)
        monkeypatch.setenv("FASTDIFF_BACKEND", "auto")
        fastdiff.reset_counts()
        out = model(*args, **kwargs)
    assert fastdiff.counts().get(("group_norm_silu", "interpreter"), 0) > 0
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_rel_close(out, ref, 1e-4, what="channels_last UNet, interpreter vs reference")


# --------------------------------------------------------------------------------------------- UNet
def _tiny_unet(**kw):
    cfg = {"base_channels": 8, "channel_mult": (1, 2), "layers_per_block": 1, "attention_levels": (1,),
           "norm_num_groups": 4}
    return UNet(**{**cfg, **kw}).eval()


def test_unet_timestep_forms_agree():
    model = _tiny_unet()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x, torch.tensor([5, 5]))
        for t in (5, 5.0, torch.tensor(5), torch.tensor([5]), torch.tensor([5.0, 5.0])):
            assert torch.equal(model(x, t), ref), f"t={t!r}"
        assert not torch.equal(model(x, torch.tensor([5, 6])), ref)


def test_unet_null_class_is_the_default_label():
    model = _tiny_unet(num_classes=3)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        null = model(x, 10, class_labels=torch.tensor([3, 3]))
        assert torch.equal(model(x, 10), null)
        assert model.null_class == 3
        assert not torch.equal(model(x, 10, class_labels=torch.tensor([0, 1])), null)


def test_unet_context_changes_output():
    model = _tiny_unet(context_dim=6, attention_levels=(0, 1))
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        a = model(x, 1, context=torch.randn(1, 4, 6))
        b = model(x, 1, context=torch.randn(1, 7, 6))  # any context length M
    assert a.shape == b.shape == (1, 3, 8, 8) and not torch.equal(a, b)


def test_unet_channels_last():
    model = _tiny_unet(context_dim=6, num_classes=2, attention_levels=(0, 1))
    x, c = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 6)
    with torch.no_grad():
        ref = model(x, 3, context=c)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last), 3, context=c)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_rel_close(out, ref, 1e-5, what="channels_last UNet")


def test_unet_block_out_channels_and_heads():
    model = UNet(block_out_channels=(8, 16, 16), layers_per_block=1, attention_levels=(2,), norm_num_groups=4,
                 num_attention_heads=2, mid_attention=False).eval()
    assert model.downsample_factor == 4
    attn = model.down_blocks[2].attentions[0]
    assert (attn.heads, attn.dim_head) == (2, 8)
    assert model.mid_block.attentions is None
    with torch.no_grad():
        assert model(torch.randn(1, 3, 12, 4), 0).shape == (1, 3, 12, 4)


@pytest.mark.parametrize("call, match", [
    (lambda m: m(torch.randn(2, 3, 7, 8), 1), "cannot be halved"),
    (lambda m: m(torch.randn(2, 4, 8, 8), 1), "in_channels=3"),
    (lambda m: m(torch.randn(3, 8, 8), 1), r"\(B, C, H, W\)"),
    (lambda m: m(torch.randn(2, 3, 8, 8), torch.tensor([1, 2, 3])), "t must be"),
    (lambda m: m(torch.randn(2, 3, 8, 8), 1, class_labels=torch.tensor([0, 1])), "unconditional"),
    (lambda m: m(torch.randn(2, 3, 8, 8), 1, context=torch.randn(2, 4, 6)), "context_dim is None"),
])
def test_unet_input_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(_tiny_unet())


@pytest.mark.parametrize("kwargs, match", [
    ({"class_labels": torch.tensor([0, 4])}, r"in \[0, 3\]"),
    ({"class_labels": torch.tensor([-1, 0])}, r"in \[0, 3\]"),
    ({"class_labels": torch.tensor([0.0, 1.0])}, "integer"),
    ({"class_labels": torch.tensor([0, 1, 2])}, r"shape \(2,\)"),
    ({"context": None}, "pass context"),
    ({"context": torch.randn(2, 4, 5)}, r"\(2, M, 6\)"),
    ({"context": torch.randn(1, 4, 6)}, r"\(2, M, 6\)"),
])
def test_conditional_unet_input_errors(kwargs, match):
    model = _tiny_unet(num_classes=3, context_dim=6)
    args = {"class_labels": torch.tensor([0, 1]), "context": torch.randn(2, 4, 6), **kwargs}
    with pytest.raises(ValueError, match=match):
        model(torch.randn(2, 3, 8, 8), 1, **args)


@pytest.mark.parametrize("kwargs, match", [
    ({"channel_mult": ()}, "positive ints"),
    ({"norm_num_groups": 3}, "must divide"),
    ({"attention_levels": (2,)}, "level indices"),
    ({"attention_head_dim": 3}, "attention_head_dim=3"),
    ({"num_classes": 0}, "num_classes"),
    ({"nonsense": 1}, "unknown UNetConfig option"),
])
def test_unet_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _tiny_unet(**kwargs)


_NUMPY_CONFIGS = [  # every config class, given numpy scalars (and a numpy array / list for tuple fields)
    (UNetConfig, dict(in_channels=np.int64(3), block_out_channels=np.array([8, 16]), layers_per_block=np.int32(1),
                      attention_levels=[np.int64(1)], norm_num_groups=np.int64(4), attention_head_dim=np.int64(8),
                      num_classes=np.int64(10), norm_eps=np.float32(1e-5), mid_attention=np.bool_(False))),
    (AutoencoderKLConfig, dict(block_out_channels=(np.int64(8), np.int64(16)), latent_channels=np.int64(4),
                               norm_num_groups=np.int16(4), scaling_factor=np.float32(0.5),
                               shift_factor=np.float64(0.1), use_quant_conv=np.bool_(True))),
    (VQVAEConfig, dict(block_out_channels=[8], norm_num_groups=np.int64(4), num_embeddings=np.int64(16),
                       embedding_dim=np.int64(3), beta=np.float32(0.25))),
    (VAEConfig, dict(input_dim=np.int64(12), hidden_dim=np.uint8(8), latent_dim=np.int64(3))),
    (DCGANConfig, dict(resolution=np.int64(32), latent_dim=np.int64(8), width=np.int32(4))),
    (StyleGeneratorConfig, dict(resolution=np.int64(8), w_dim=np.int64(8), w_avg_beta=np.float32(0.5))),
    (DigitClassifierConfig, dict(image_size=np.int64(16), width=np.int64(4), num_classes=np.int64(10))),
]


@pytest.mark.parametrize("config_class, kwargs", _NUMPY_CONFIGS, ids=[c.__name__ for c, _ in _NUMPY_CONFIGS])
def test_configs_store_plain_python_values(config_class, kwargs):
    """numpy scalars are accepted and stored as int / float / bool (a config must write to JSON), tuples as tuples
    of them; the values are unchanged."""
    cfg = config_class(**kwargs)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        for v in value if isinstance(value, tuple) else (value,):
            assert v is None or type(v) in (int, float, bool, str), f"{f.name}={v!r} is a {type(v).__name__}"
    for name, given in kwargs.items():
        expected = tuple(np.asarray(given).tolist()) if isinstance(given, (list, tuple, np.ndarray)) else given.item()
        assert getattr(cfg, name) == expected and dataclasses.replace(cfg) == cfg


@pytest.mark.parametrize("config_class, kwargs, match", [
    (UNetConfig, {"in_channels": 3.0}, "in_channels must be an integer"),
    (UNetConfig, {"block_out_channels": (8, "16")}, r"block_out_channels\[1\] must be an integer"),
    (UNetConfig, {"channel_mult": 2}, "channel_mult must be a tuple"),
    (UNetConfig, {"mid_attention": 1}, "mid_attention must be a bool"),
    (UNetConfig, {"norm_eps": "1e-5"}, "norm_eps must be a real number"),
    (VAEConfig, {"latent_dim": True}, "latent_dim must be an integer"),
    (DCGANConfig, {"resolution": 32.0}, "resolution must be an integer"),
    (AutoencoderKLConfig, {"shift_factor": "0"}, r"shift_factor must be a real number or None, got str '0'"),
    (DigitClassifierConfig, {"width": np.float64(4)}, "width must be an integer"),
])
def test_config_field_types(config_class, kwargs, match):
    with pytest.raises(TypeError, match=match):
        config_class(**kwargs)


@pytest.mark.parametrize("config_class, kwargs, match", [
    (UNetConfig, {"attention_head_dim": 0}, "attention_head_dim must be ≥ 1"),
    (UNetConfig, {"num_attention_heads": -1}, "num_attention_heads must be ≥ 1"),
    (VAEConfig, {"latent_dim": np.int64(0)}, "latent_dim must be ≥ 1"),
    (DigitClassifierConfig, {"image_size": 18}, "image_size must be a positive multiple of 4"),
    (DigitClassifierConfig, {"num_classes": 0}, "num_classes must be ≥ 1"),
])
def test_config_field_values(config_class, kwargs, match):
    with pytest.raises(ValueError, match=match):
        config_class(**kwargs)


def test_unet_config_object():
    cfg = UNetConfig(base_channels=8, channel_mult=(1, 2), layers_per_block=1, norm_num_groups=4)
    assert UNet(cfg).config == cfg
    with pytest.raises(TypeError):
        UNet("not a config")


# --------------------------------------------------------------------------------------------- autoencoders
def test_autoencoder_kl_encode_decode():
    torch.manual_seed(0)
    model = AutoencoderKL(block_out_channels=(8, 16, 16), latent_channels=4, norm_num_groups=4).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        post = model.encode(x)
        assert post.mean.shape == post.logvar.shape == (2, 4, 4, 4)
        assert post.kl().shape == (2,)
        z1 = post.sample(torch.Generator().manual_seed(0))
        z2 = post.sample(torch.Generator().manual_seed(0))
        assert torch.equal(z1, z2) and not torch.equal(z1, post.mode())
        assert model.decode(z1).shape == (2, 3, 16, 16)
        recon, _, _ = model(x, sample_posterior=True, generator=torch.Generator().manual_seed(0))
        assert torch.equal(recon, model.decode(z1))
    assert model.config.scaling_factor == 0.18215
    with pytest.raises(ValueError, match="multiples of 4"):
        model.encode(torch.randn(1, 3, 10, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.encode(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"z must have shape \(B, 4, H, W\)"):
        model.decode(torch.randn(1, 3, 4, 4))


def test_autoencoder_kl_without_quant_convs():
    model = AutoencoderKL(block_out_channels=(8,), latent_channels=2, norm_num_groups=4, use_quant_conv=False,
                          use_post_quant_conv=False, mid_attention=False)
    assert model.quant_conv is None and model.post_quant_conv is None
    assert not any("attentions" in k for k in model.state_dict())
    with torch.no_grad():
        assert model(torch.randn(1, 3, 5, 5))[0].shape == (1, 3, 5, 5)


def test_vae_mlp():
    torch.manual_seed(0)
    model = VAE(input_dim=12, hidden_dim=8, latent_dim=3)
    mu, log_var = model.encode(torch.rand(2, 12))
    assert mu.shape == log_var.shape == (2, 3)
    assert model.decode(mu).shape == (2, 12)
    assert ((model.decode(mu) > 0) & (model.decode(mu) < 1)).all()
    z = model.reparameterize(torch.zeros(4, 3), torch.full((4, 3), -60.0))
    assert torch.allclose(z, torch.zeros(4, 3), atol=1e-12)
    with pytest.raises(ValueError, match="input_dim|12"):
        model(torch.rand(2, 13))
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        model.decode(torch.rand(2, 4))


@needs_vq
def test_vqvae_indices_round_trip():
    torch.manual_seed(0)
    model = VQVAE(block_out_channels=(8, 16), latent_channels=3, norm_num_groups=4, num_embeddings=8).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        idx = model.encode(x)
        assert idx.shape == (2, 4, 4) and idx.dtype == torch.int64
        assert int(idx.min()) >= 0 and int(idx.max()) < 8
        recon, idx2, vq_loss = model(x)
        assert torch.equal(idx, idx2) and vq_loss.ndim == 0
        assert torch.allclose(model.decode_indices(idx), recon, atol=1e-5)
    with pytest.raises(ValueError, match="integer tensor"):
        model.decode_indices(torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="multiples of 2"):
        model.encode(torch.randn(1, 3, 7, 8))


# --------------------------------------------------------------------------------------------- GANs
@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_dcgan_resolutions(resolution):
    cfg = DCGANConfig(resolution=resolution, latent_dim=8, channels=3, width=4)
    g, d = DCGANGenerator(cfg).eval(), DCGANDiscriminator(cfg).eval()
    with torch.no_grad():
        img = g(torch.randn(2, 8, 1, 1))
        assert img.shape == (2, 3, resolution, resolution) and img.abs().max() <= 1
        assert d(img).shape == (2, 1)


@pytest.mark.parametrize("resolution", [8, 24, 128, 63])
def test_dcgan_bad_resolution(resolution):
    with pytest.raises(ValueError, match="resolution"):
        DCGANGenerator(resolution=resolution)


def test_gan_input_errors():
    g, d = DCGANGenerator(resolution=16, latent_dim=8, width=4), DCGANDiscriminator(resolution=16, width=4)
    with pytest.raises(ValueError, match=r"\(B, 8\)"):
        g(torch.randn(2, 9))
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        d(torch.randn(2, 3, 32, 32))
    s = StyleGenerator(resolution=8, latent_dim=8, w_dim=8, base_channels=4, max_channels=8)
    with pytest.raises(ValueError, match=r"\(B, 8\)"):
        s(torch.randn(2, 7))
    with pytest.raises(ValueError, match="noise"):
        s(torch.randn(2, 8), noise=[torch.randn(2, 1, 4, 4)])
    with pytest.raises(ValueError, match="power of two"):
        StyleGenerator(resolution=12)
