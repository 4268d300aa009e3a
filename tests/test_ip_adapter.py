"""IP-Adapter: the decoupled cross-attention against attention written here (softmax(qkᵀ/√d)v), attach/detach leaving
the UNet's weights and outputs exactly the base model's, the pipeline's image-prompted CFG against a plain two-pass
DDIM loop (alone and with a ControlNet), scale 0 = the base model exactly, load/unload, the extension folder,
argument errors before any work, the adapter's attention through fastdiff's ops, CUDA graphs of the wrapped denoiser
(on the CPU with tests/test_cuda_graph.py's fakes), compile(), ``fastdiff sample --image-prompt``, the eval, and the
shipped digits-ip-adapter (the recipe runs in tests/test_training.py with every recipe).

The tiny text pipeline of tests/model_factories.py (16×16 images, 8×8 latents, cross-attention at both levels) with
a small image encoder and an adapter whose image key/value projections are random (not the text ones), so the image
prompt changes the images."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from model_factories import tiny_text_pipeline
from PIL import Image
from test_controlnet_pipeline import check_graphed_steps, controlled_eps, edge_maps, make_controlnet
from test_text_to_image import STEPS, Calls, close, ddim_reference, differ, encode, noise, sample

import fastdiff
from fastdiff import dispatch, ops
from fastdiff.models import ImageEncoder, IPAdapter, UNet
from fastdiff.models.ip_adapter import cross_attention_layers
from fastdiff.nn import GroupNormSiLU
from fastdiff.pipelines import save_extension
from fastdiff.pipelines.controlnet import ControlledUNet
from fastdiff.pipelines.cuda_graph import GraphCache
from fastdiff.pipelines.ip_adapter import IPAdaptedUNet
from tests.test_cli import run_here
from tests.test_cuda_graph import fake_cuda  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)

P0, P1 = "a bold seven", "the digit 3, slanted left"


def make_adapter(unet, seed: int = 4, embed_dim: int = 8, num_tokens: int = 3):
    """An image encoder and an IP-Adapter for ``unet`` with random weights (seeded), so the image branch acts."""
    torch.manual_seed(seed)
    encoder = ImageEncoder(block_out_channels=(8, 8), norm_num_groups=4, projection_dim=embed_dim).eval()
    adapter = IPAdapter.from_unet(unet, image_embed_dim=embed_dim, num_tokens=num_tokens)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return encoder, adapter.eval()


@pytest.fixture
def pipe():
    """The tiny text pipeline with a random IP-Adapter attached."""
    pipe = tiny_text_pipeline(seed=0)
    pipe.image_encoder, pipe.ip_adapter = make_adapter(pipe.unet)
    pipe._check_ip_adapter()
    return pipe


def digits(batch: int, seed: int = 7) -> torch.Tensor:
    """Random image prompts (batch, 1, 16, 16) in [0, 1]."""
    return torch.rand(batch, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def tokens_of(pipe, images: torch.Tensor, unconditional: bool = False) -> torch.Tensor:
    """The adapter's image tokens of image prompts in [0, 1], straight from the components (unconditional: the
    tokens of a zero embedding)."""
    with torch.no_grad():
        embeds = pipe.image_encoder(images * 2 - 1)
        return pipe.ip_adapter(torch.zeros_like(embeds) if unconditional else embeds)


def reference_sample(pipe, prompts, guidance: float, latents, images, scale: float = 1.0, control=None):
    """A plain image-prompted sampler (test_text_to_image.ddim_reference): the conditional half with the images'
    tokens, the unconditional half (the empty prompt) with a zero embedding's tokens, in separate passes; with
    ``control`` each half also gets the ControlNet's residuals (the ControlNet sees the text only)."""
    cond = encode(pipe, prompts)
    uncond = encode(pipe, [""] * len(prompts)) if guidance != 1.0 else None
    image_tokens = {False: tokens_of(pipe, images), True: tokens_of(pipe, images, unconditional=True)}

    def eps(x, t_batch, context, unconditional):
        with pipe.ip_adapter.conditioned(image_tokens[unconditional], scale):
            if control is None:
                return pipe.unet(x, t_batch, context=context)
            return controlled_eps(pipe, x, t_batch, context, control, 1.0)

    return ddim_reference(pipe, cond, uncond, guidance, latents, eps)


def sdpa(q, k, v):
    """softmax(q kᵀ / √d) v in float64, written out."""
    q, k, v = q.double(), k.double(), v.double()
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


# --------------------------------------------------------------------------------------------- 1. the model
def test_from_unet_makes_one_layer_per_cross_attention_initialised_from_the_text_projections():
    pipe = tiny_text_pipeline(seed=0)
    layers = cross_attention_layers(pipe.unet)
    by_name = [name for name, _ in pipe.unet.named_modules() if name.endswith(".attn2")]
    assert [name for name, _ in layers] == by_name and len(by_name) == 7  # down 2, middle 1, up 2 × 2
    adapter = IPAdapter.from_unet(pipe.unet, image_embed_dim=8, num_tokens=5)
    cfg = adapter.config
    assert cfg.layer_names == tuple(n for n, _ in layers) and cfg.cross_attention_dim == 16 and cfg.num_tokens == 5
    for layer, (_, attn) in zip(adapter.layers, layers):
        assert torch.equal(layer.to_k_ip.weight, attn.to_k.weight) and torch.equal(layer.to_v_ip.weight,
                                                                                   attn.to_v.weight)
        assert layer.to_k_ip.bias is None
    tokens = adapter(torch.randn(2, 8))
    assert tokens.shape == (2, 5, 16)
    # each token is LayerNorm'd: zero mean, unit variance over its 16 features (weight 1, bias 0 at the start)
    close(tokens.mean(-1), torch.zeros(2, 5), atol=1e-5)


def test_image_encoder_shapes_and_errors():
    enc = ImageEncoder(block_out_channels=(8, 16, 16), norm_num_groups=4, projection_dim=12)
    assert enc(torch.randn(3, 1, 16, 16)).shape == (3, 12)
    with pytest.raises(ValueError, match="pixel_values"):
        enc(torch.randn(3, 1, 8, 8))
    with pytest.raises(TypeError, match="pixel_values"):
        enc(torch.zeros(3, 1, 16, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match="sample_size"):
        ImageEncoder(sample_size=10)
    with pytest.raises(ValueError, match="norm_num_groups"):
        ImageEncoder(block_out_channels=(6,), norm_num_groups=4)


def test_adapter_argument_errors():
    pipe = tiny_text_pipeline(seed=0)
    adapter = IPAdapter.from_unet(pipe.unet, image_embed_dim=8)
    with pytest.raises(ValueError, match="image_embeds"):
        adapter(torch.randn(2, 9))
    with pytest.raises(TypeError, match="image_embeds"):
        adapter(np.zeros((2, 8)))
    with pytest.raises(ValueError, match="layer_names"):
        IPAdapter(image_embed_dim=8)
    with pytest.raises(ValueError, match="tokens"):
        with adapter.conditioned(torch.randn(2, 3, 16)):
            pass
    unconditioned = UNet(in_channels=2, out_channels=2, base_channels=8, channel_mult=(1, 2), layers_per_block=1,
                         attention_levels=(0,), norm_num_groups=4, attention_head_dim=8)
    with pytest.raises(ValueError, match="cross-attention UNet"):
        IPAdapter.from_unet(unconditioned)
    other = UNet(in_channels=2, out_channels=2, base_channels=8, channel_mult=(1, 2), layers_per_block=1,
                 attention_levels=(0,), norm_num_groups=4, attention_head_dim=8, context_dim=16)
    with pytest.raises(ValueError, match="another UNet"):
        adapter.attach(other)  # its cross-attention layers are not the adapter's


def test_decoupled_attention_matches_attention_written_here(pipe):
    """One cross-attention module with the adapter attached: to_out(attn(q, k_text, v_text) + s·attn(q, k_ip,
    v_ip)) with the text query, per head; and the module alone without tokens."""
    name, attn = cross_attention_layers(pipe.unet)[0]
    layer = pipe.ip_adapter.layers[0]
    g = torch.Generator().manual_seed(0)
    x, context, tokens = torch.randn(2, 64, attn.to_q.in_features, generator=g), torch.randn(2, 8, 16, generator=g), \
        torch.randn(2, 3, 16, generator=g)
    h, d = attn.heads, attn.dim_head

    def heads(t):
        return t.view(t.shape[0], t.shape[1], h, d).transpose(1, 2)

    with torch.no_grad():
        q, k, v = heads(attn.to_q(x)), heads(attn.to_k(context)), heads(attn.to_v(context))
        k_ip, v_ip = heads(layer.to_k_ip(tokens)), heads(layer.to_v_ip(tokens))
        for scale in (1.0, 0.4):
            mixed = sdpa(q, k, v) + scale * sdpa(q, k_ip, v_ip)
            expected = attn.to_out(mixed.float().transpose(1, 2).reshape(2, 64, h * d))
            with pipe.ip_adapter.conditioned(tokens, scale):
                close(attn(x, context), expected, atol=1e-5)
        alone = attn.to_out(sdpa(q, k, v).float().transpose(1, 2).reshape(2, 64, h * d))
        close(attn(x, context), alone, atol=1e-5)  # outside the block: no image branch


def test_attach_and_detach_leave_the_unets_weights_and_outputs_exactly():
    base = tiny_text_pipeline(seed=0)
    unet = base.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    params = [id(p) for p in unet.parameters()]
    g = torch.Generator().manual_seed(3)
    x, t, context = torch.randn(2, 2, 8, 8, generator=g), torch.tensor([10.0, 500.0]), torch.randn(2, 8, 16,
                                                                                                    generator=g)
    with torch.no_grad():
        plain = unet(x, t, context=context)
        _, adapter = make_adapter(unet)
        adapter.attach(unet)
        assert adapter.is_attached(unet)
        assert list(unet.state_dict()) == list(before) and [id(p) for p in unet.parameters()] == params
        attached = unet(x, t, context=context)  # no tokens: the UNet alone, bit for bit
        with adapter.conditioned(adapter(torch.randn(2, 8, generator=g))):
            imaged = unet(x, t, context=context)
        with adapter.conditioned(adapter(torch.randn(2, 8, generator=g)), 0.0):
            zero = unet(x, t, context=context)
        adapter.detach(unet)
        assert not adapter.is_attached(unet)
        detached = unet(x, t, context=context)
    assert torch.equal(attached, plain) and torch.equal(zero, plain) and torch.equal(detached, plain)
    differ(imaged, plain)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    assert all("_ip" not in attn.__dict__ for _, attn in cross_attention_layers(unet))


# --------------------------------------------------------------------------------------------- 2. the pipeline
@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_image_prompted_cfg_matches_a_plain_loop(pipe, scale):
    latents, images = noise(2), digits(2)
    ref = reference_sample(pipe, ["", P1], 3.0, latents, images, scale)
    calls = Calls(pipe)
    out = sample(pipe, prompt=["", P1], guidance_scale=3.0, latents=latents, ip_adapter_image=images,
                 ip_adapter_scale=scale)
    calls.remove()
    close(out, ref)
    assert calls.log["unet"] == [4] * STEPS  # [uncond; cond] in one UNet call per step
    # the image prompt does something (so the comparison can fail), and each image follows its own prompt
    differ(out, sample(pipe, prompt=["", P1], guidance_scale=3.0, latents=latents))
    differ(out, sample(pipe, prompt=["", P1], guidance_scale=3.0, latents=latents, ip_adapter_image=images.flip(0),
                       ip_adapter_scale=scale))


def test_without_guidance_matches_a_plain_loop(pipe):
    latents, images = noise(2), digits(2)
    out = sample(pipe, prompt=[P0, ""], guidance_scale=1.0, latents=latents, ip_adapter_image=images)
    close(out, reference_sample(pipe, [P0, ""], 1.0, latents, images))


def test_with_a_controlnet_both_apply_and_match_a_plain_loop(pipe):
    pipe.controlnet = make_controlnet(pipe.unet)
    latents, images, control = noise(2), digits(2), edge_maps(2)
    both = sample(pipe, prompt=["", P0], guidance_scale=3.0, latents=latents, ip_adapter_image=images, image=control)
    close(both, reference_sample(pipe, ["", P0], 3.0, latents, images, control=control))
    differ(both, sample(pipe, prompt=["", P0], guidance_scale=3.0, latents=latents, image=control))
    differ(both, sample(pipe, prompt=["", P0], guidance_scale=3.0, latents=latents, ip_adapter_image=images))


def test_scale_zero_and_unload_are_the_base_model_exactly(pipe):
    latents, images = noise(2), digits(2)
    fresh = tiny_text_pipeline(seed=0)
    base = sample(fresh, prompt=["", P0], latents=latents)
    assert torch.equal(sample(pipe, prompt=["", P0], latents=latents), base)  # attached, no image prompt
    assert torch.equal(sample(pipe, prompt=["", P0], latents=latents, ip_adapter_image=images, ip_adapter_scale=0.0),
                       base)
    pipe.set_ip_adapter_scale(0)
    assert torch.equal(sample(pipe, prompt=["", P0], latents=latents, ip_adapter_image=images), base)
    pipe.unload_ip_adapter()
    assert pipe.ip_adapter is None and pipe.image_encoder is None
    assert torch.equal(sample(pipe, prompt=["", P0], latents=latents), base)
    assert all(torch.equal(v, fresh.unet.state_dict()[k]) for k, v in pipe.unet.state_dict().items())
    with pytest.raises(ValueError, match="ip_adapter_image"):
        sample(pipe, prompt="", ip_adapter_image=images[:1])


def test_the_default_scale_comes_from_the_settings(pipe):
    latents, images = noise(1), digits(1)
    half = sample(pipe, prompt="", latents=latents, ip_adapter_image=images, ip_adapter_scale=0.5)
    pipe.set_ip_adapter_scale(0.5)
    assert torch.equal(sample(pipe, prompt="", latents=latents, ip_adapter_image=images), half)


def test_image_prompt_forms_and_batching(pipe):
    """PIL, uint8 numpy and a [0, 1] tensor of one image give the same images; a 32×32 RGB prompt is made gray and
    resized; one prompt image serves every image, or one per prompt repeated for its images."""
    latents, image = noise(2), digits(1)[0, 0]
    as_uint8 = (image.numpy() * 255).round().astype(np.uint8)
    exact = torch.from_numpy(as_uint8).float().div(255)[None, None]
    by_tensor = sample(pipe, prompt=["", ""], latents=latents, ip_adapter_image=exact)
    for form in (Image.fromarray(as_uint8, mode="L"), as_uint8, [Image.fromarray(as_uint8, mode="L")]):
        close(sample(pipe, prompt=["", ""], latents=latents, ip_adapter_image=form), by_tensor, atol=1e-6)
    doubled = np.kron(as_uint8, np.ones((2, 2), np.uint8))
    big = Image.fromarray(np.stack([doubled] * 3, -1), mode="RGB")  # gray as RGB: luma = the gray value
    shrunk = F.interpolate(torch.from_numpy(doubled).float().div(255)[None, None], size=(16, 16), mode="bilinear",
                           align_corners=False, antialias=True).clamp(0, 1)
    close(pipe._ip_pixels(big, 1, 1), shrunk * 2 - 1, atol=1e-6)  # the encoder's input: gray, resized, in [−1, 1]
    close(sample(pipe, prompt=["", ""], latents=latents, ip_adapter_image=big),
          sample(pipe, prompt=["", ""], latents=latents, ip_adapter_image=shrunk), atol=1e-5)
    two = digits(2)
    per_prompt = sample(pipe, prompt=["", P0], num_images_per_prompt=2, latents=noise(4), ip_adapter_image=two)
    per_image = sample(pipe, prompt=["", P0], num_images_per_prompt=2, latents=noise(4),
                       ip_adapter_image=two.repeat_interleave(2, dim=0))
    assert torch.equal(per_prompt, per_image)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"ip_adapter_scale": 0.5}, ValueError, "ip_adapter_scale needs ip_adapter_image"),
    ({"ip_adapter_image": "digit.png"}, TypeError, "ip_adapter_image"),
    ({"ip_adapter_image": torch.rand(1, 3, 16, 16)}, ValueError, "ip_adapter_image: a tensor has 3 channels"),
    ({"ip_adapter_image": torch.rand(3, 1, 16, 16)}, ValueError, "ip_adapter_image holds 3"),
    ({"ip_adapter_image": torch.rand(1, 1, 16, 16) * 2}, ValueError, "ip_adapter_image: a tensor must hold values"),
    ({"ip_adapter_image": torch.rand(1, 1, 16, 16), "ip_adapter_scale": "1"}, TypeError, "ip_adapter_scale"),
    ({"ip_adapter_image": torch.rand(1, 1, 16, 16), "ip_adapter_scale": float("nan")}, ValueError,
     "ip_adapter_scale"),
])
def test_bad_image_prompt_arguments_fail_before_any_work(pipe, kwargs, error, message):
    calls = Calls(pipe)
    with pytest.raises(error, match=message):
        sample(pipe, prompt=["", P0], **kwargs)
    calls.remove()
    assert not calls.any()


def test_mismatched_components_are_refused(pipe):
    from fastdiff.pipelines import TextToImagePipeline

    p = tiny_text_pipeline(seed=1)
    encoder, adapter = make_adapter(p.unet)
    parts = (p.unet, p.vae, p.scheduler, p.text_encoder, p.tokenizer)
    with pytest.raises(ValueError, match="come together"):
        TextToImagePipeline(*parts, sample_size=8, image_encoder=encoder)
    with pytest.raises(TypeError, match="ip_adapter must be"):
        TextToImagePipeline(*parts, sample_size=8, image_encoder=encoder, ip_adapter=encoder)
    wide = ImageEncoder(block_out_channels=(8,), norm_num_groups=4, projection_dim=9)
    with pytest.raises(ValueError, match="projection_dim"):
        TextToImagePipeline(*parts, sample_size=8, image_encoder=wide, ip_adapter=adapter)
    other = UNet(in_channels=2, out_channels=2, base_channels=8, channel_mult=(1, 2), layers_per_block=1,
                 attention_levels=(0,), norm_num_groups=4, attention_head_dim=8, context_dim=16)
    with pytest.raises(ValueError, match="another UNet"):
        TextToImagePipeline(other, *parts[1:], sample_size=8, image_encoder=encoder, ip_adapter=adapter)
    pipe.ip_adapter.to(torch.float64)  # on another dtype than the pipeline: refused before any work
    calls = Calls(pipe)
    with pytest.raises(ValueError, match="ip_adapter is on"):
        sample(pipe, prompt="", ip_adapter_image=digits(1))
    assert not calls.any()


# --------------------------------------------------------------------------------------------- 3. saving and loading
def test_extension_folder_and_load_unload(tmp_path, pipe):
    base = tiny_text_pipeline(seed=0)
    base.save_pretrained(tmp_path / "base")
    save_extension(tmp_path / "ip", "../base", {"image_encoder": pipe.image_encoder, "ip_adapter": pipe.ip_adapter},
                   settings={"default_ip_adapter_scale": 0.7})
    latents, images = noise(1), digits(1)
    expected = sample(pipe, prompt="", latents=latents, ip_adapter_image=images, ip_adapter_scale=0.7)
    loaded = fastdiff.load(tmp_path / "ip")
    assert loaded.ip_adapter is not None and loaded.settings["default_ip_adapter_scale"] == 0.7
    close(sample(loaded, prompt="", latents=latents, ip_adapter_image=images), expected, atol=1e-6)
    # load_ip_adapter onto a plain pipeline: the same images; unload: the base's again, its weights untouched
    plain = fastdiff.load(tmp_path / "base")
    weights = {k: v.clone() for k, v in plain.unet.state_dict().items()}
    before = sample(plain, prompt="", latents=latents)
    plain.load_ip_adapter(str(tmp_path / "ip"))
    close(sample(plain, prompt="", latents=latents, ip_adapter_image=images), expected, atol=1e-6)
    plain.unload_ip_adapter()
    assert torch.equal(sample(plain, prompt="", latents=latents), before)
    assert all(torch.equal(v, weights[k]) for k, v in plain.unet.state_dict().items())
    with pytest.raises(ValueError, match="holds no image_encoder"):
        plain.load_ip_adapter(str(tmp_path / "base"))
    # a saved pipeline with its adapter round-trips
    pipe.save_pretrained(tmp_path / "whole")
    again = fastdiff.load(tmp_path / "whole")
    close(sample(again, prompt="", latents=latents, ip_adapter_image=images, ip_adapter_scale=0.7), expected,
          atol=1e-6)


def test_load_ip_adapter_refuses_an_adapter_of_another_unet_and_keeps_the_old(tmp_path, pipe):
    other = tiny_text_pipeline(seed=0)
    other.unet = UNet(in_channels=2, out_channels=2, base_channels=8, channel_mult=(1, 2), layers_per_block=1,
                      attention_levels=(1,), norm_num_groups=4, attention_head_dim=8, context_dim=16).eval()
    other.save_pretrained(tmp_path / "other")
    enc, adapter = make_adapter(other.unet)
    save_extension(tmp_path / "other-ip", "../other", {"image_encoder": enc, "ip_adapter": adapter})
    old = pipe.ip_adapter
    with pytest.raises(ValueError, match="another UNet"):
        pipe.load_ip_adapter(str(tmp_path / "other-ip"))
    assert pipe.ip_adapter is old and old.is_attached(pipe.unet)


# --------------------------------------------------------------------------------------------- 4. acceleration
def test_the_image_branch_runs_through_fastdiff_attention(pipe, monkeypatch):
    """Each cross-attention layer makes one more attention call per UNet call (the image tokens as keys), through
    the dispatched op; the image encoder's GroupNorm+SiLU is the fused op; the guided step stays one fused DDIM
    step."""
    shapes = []
    attention = ops.attention

    def recording(q, k, v, **kwargs):
        shapes.append(tuple(k.shape))
        return attention(q, k, v, **kwargs)

    monkeypatch.setattr(ops, "attention", recording)
    dispatch.reset_counts()
    sample(pipe, prompt=["", P0], guidance_scale=3.0)
    plain = dispatch.counts()
    shapes.clear()
    dispatch.reset_counts()
    sample(pipe, prompt=["", P0], guidance_scale=3.0, ip_adapter_image=digits(2))
    counts = dispatch.counts()
    # the image encoder's GroupNorm+SiLU layers run as the fused op, once per call (the prompts are encoded once)

    def total(c, op):
        return sum(v for (name, _), v in c.items() if name == op)

    norms = sum(isinstance(m, GroupNormSiLU) for m in pipe.image_encoder.modules())
    assert norms == 2 and total(counts, "group_norm_silu") == total(plain, "group_norm_silu") + norms
    image_keys = [s for s in shapes if s[2] == pipe.ip_adapter.config.num_tokens]
    assert len(image_keys) == len(cross_attention_layers(pipe.unet)) * STEPS
    assert all(s[0] == 4 for s in image_keys)  # [uncond; cond]
    assert sum(v for (name, _), v in counts.items() if name == "attention") == len(shapes)
    assert sum(v for (name, _), v in counts.items() if name == "ddim_step") == STEPS
    if dispatch.interpret_enabled() and os.environ.get("FASTDIFF_BACKEND", "auto") == "auto":
        # CPU tensors under TRITON_INTERPRET=1 take the GPU path's fused Triton attention, the image branch's too
        assert counts.get(("attention", "interpreter"), 0) == len(shapes), counts


def test_cuda_graphs_capture_the_adapted_step_once(fake_cuda, pipe):  # noqa: F811 (the fixture)
    """The wrapper is one model for the graph cache: captured once, then replayed with new image tokens and scale
    (static buffers filled in place)."""
    sched, cache = pipe.scheduler, GraphCache(8)
    sched.set_timesteps(3)
    x = noise(2)
    context = torch.cat([encode(pipe, ["", ""]), encode(pipe, [P0, P1])])
    prompts = {"a": digits(2, seed=5), "b": digits(2, seed=6)}

    def run_steps(name, scale):
        tokens = torch.cat([tokens_of(pipe, prompts[name], True), tokens_of(pipe, prompts[name])])

        def eps(model_in, t_batch):
            with pipe.ip_adapter.conditioned(tokens, scale):
                return pipe.unet(model_in, t_batch, context=context)

        with torch.inference_mode():
            pipe._ip = (tokens, scale)
            model = pipe._denoiser(pipe.unet, True)
            check_graphed_steps(pipe, cache, model, x, context, eps)
            pipe._ip = None
            return model

    first = run_steps("a", 1.0)
    assert isinstance(first, IPAdaptedUNet)
    ptr = tuple(t.data_ptr() for t in first._current)
    assert run_steps("b", 0.5) is first and tuple(t.data_ptr() for t in first._current) == ptr
    assert cache.captures == 1 and cache.replays == 6


def test_the_wrapper_passes_the_unets_config_and_needs_its_image_first(pipe):
    for inner in (pipe.unet, ControlledUNet(pipe.unet, make_controlnet(pipe.unet))):
        wrapper = IPAdaptedUNet(inner, pipe.ip_adapter)
        assert wrapper.config is pipe.unet.config and wrapper.model is inner
        with pytest.raises(RuntimeError, match=r"set_image\(tokens, scale\)"):
            wrapper(noise(1), 10.0, context=encode(pipe, [P0]))


# --------------------------------------------------------------------------------------------- 5. fastdiff sample
@pytest.fixture(scope="module")
def cli_models(tmp_path_factory):
    """A tiny text model folder, an IP-Adapter extension folder on it, and a digit PNG (32×32 RGB)."""
    root = tmp_path_factory.mktemp("models")
    base = tiny_text_pipeline(seed=0)
    base.save_pretrained(root / "tiny-text")
    encoder, adapter = make_adapter(base.unet)
    save_extension(root / "tiny-ip", "../tiny-text", {"image_encoder": encoder, "ip_adapter": adapter})
    digit = (digits(1, seed=3)[0, 0].numpy() * 255).astype(np.uint8)
    Image.fromarray(np.stack([np.kron(digit, np.ones((2, 2), np.uint8))] * 3, -1), mode="RGB").save(root / "d.png")
    return root


def test_sample_image_prompt_writes_a_png(tmp_path, cli_models, capsys):
    out, zero, plain, loaded = (tmp_path / n for n in ("ip.png", "zero.png", "plain.png", "loaded.png"))
    common = ["--num", "4", "--dtype", "fp32", "--steps", "3"]
    image = ["--image-prompt", str(cli_models / "d.png")]
    for model, extra, path in (("tiny-ip", image, out), ("tiny-ip", [*image, "--ip-adapter-scale", "0"], zero),
                               ("tiny-text", ["--prompt", ""], plain),
                               ("tiny-text", [*image, "--ip-adapter", str(cli_models / "tiny-ip")], loaded)):
        res = run_here(capsys, "sample", "--model", str(cli_models / model), *common, *extra, "--out", str(path))
        assert res.returncode == 0, res.stderr
        assert str(path) in res.stdout and ("image prompt" in res.stdout) == (extra != ["--prompt", ""])
    with Image.open(out) as im:
        assert im.format == "PNG" and im.mode == "L"
    # scale 0 is the base model with the empty prompt; the image prompt changes the images; --ip-adapter loads it
    assert zero.read_bytes() == plain.read_bytes() and out.read_bytes() != plain.read_bytes()
    assert loaded.read_bytes() == out.read_bytes()


@pytest.mark.parametrize("args, message", [
    (["--ip-adapter-scale", "0.5"], "--ip-adapter-scale needs --image-prompt"),
    (["--image-prompt", "d.png", "--class", "3"], "not both"),
    (["--image-prompt", "d.png", "--ip-adapter", "tiny-text"], "has no IP-Adapter and --ip-adapter"),
])
def test_image_prompt_usage_errors_are_one_line_exit_2_nothing_written(tmp_path, cli_models, capsys, args,
                                                                       message):
    args = [str(cli_models / a) if a.endswith(".png") or a == "tiny-text" else a for a in args]
    res = run_here(capsys, "sample", "--model", str(cli_models / "tiny-text"), "--num", "2", *args, "--out",
                   str(tmp_path / "x.png"))
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("fastdiff: error: "), res.stderr
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------- 6. recipe, shipped model
def test_the_eval_report_is_recomputed_here(pipe):
    """evaluate_image_prompts on the tiny pipeline: its accuracy, bold/thin masses and correlation against the same
    samples scored here (numpy's corrcoef, the prompts' mass quartiles)."""
    pytest.importorskip("sklearn")
    from fastdiff import evaluation
    from fastdiff.data import load_digits
    from fastdiff.prompts import ATTRIBUTE_THRESHOLDS, digit_attributes

    report = evaluation.evaluate_image_prompts(pipe, num=40, steps=2, guidance=3.0, seed=5, progress=False)
    x, y = load_digits("test")
    x, y = x[:40], y[:40]
    images = pipe(prompt=[""] * 40, ip_adapter_image=(x + 1) / 2, num_inference_steps=2, guidance_scale=3.0,
                  generator=torch.Generator().manual_seed(5), output_type="pt", progress=False) * 2 - 1
    _, preds = evaluation._features_and_predictions(evaluation.load_classifier(), images)
    got = report["image_prompted"]
    assert got["accuracy"] == pytest.approx(float((preds == y).float().mean()))
    prompt_mass, sample_mass = digit_attributes(x)["mass"].numpy(), digit_attributes(images)["mass"].numpy()
    lo, hi = ATTRIBUTE_THRESHOLDS["mass"]
    bold, thin = prompt_mass > hi, prompt_mass <= lo
    assert bold.any() and thin.any() and report["bold_prompts"] == bold.sum()
    assert got["bold_mass"] == pytest.approx(sample_mass[bold].mean(), rel=1e-5)
    assert got["thin_mass"] == pytest.approx(sample_mass[thin].mean(), rel=1e-5)
    assert got["mass_correlation"] == pytest.approx(np.corrcoef(prompt_mass, sample_mass)[0, 1], abs=1e-5)
    assert report["baseline"]["accuracy"] != got["accuracy"] or report["baseline"]["bold_mass"] != got["bold_mass"]
    text = evaluation.format_image_prompt_report("tiny", report)
    assert "| with the image prompt |" in text and "targets:" in text


def test_image_prompt_grid(tmp_path, pipe):
    pytest.importorskip("sklearn")
    from fastdiff import evaluation
    from fastdiff.data import load_digits

    pipe.controlnet = make_controlnet(pipe.unet)
    path = evaluation.image_prompt_grid(pipe, tmp_path / "g.png", num=3, columns=2, scale=1)
    pixels = np.asarray(Image.open(path))
    assert pixels.shape[0] == (1 + 2 + 2) * (16 + 2) + 2  # prompts, 2 sample rows, edge maps, image + control
    x, _ = load_digits("test")
    left = pixels.shape[1] - 3 * (16 + 2)
    first = pixels[2:18, left:left + 16]  # row 0, column 0: the first image prompt
    assert np.array_equal(first, ((x[0, 0] + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy())


def test_the_shipped_digits_ip_adapter_follows_the_image_prompt():
    """20 held-out digits as image prompts with the empty text prompt, 10 steps: ≥ 90% drawn as the prompt's digit;
    the 8 boldest prompts give bolder samples than the 8 thinnest; scale 0 is digits-sd exactly."""
    pytest.importorskip("sklearn")
    from fastdiff import evaluation
    from fastdiff.data import load_digits
    from fastdiff.prompts import digit_attributes

    pipe = fastdiff.load("digits-ip-adapter")
    assert isinstance(pipe.ip_adapter, IPAdapter) and pipe.controlnet is None
    x, y = load_digits("test")

    def run(prompts, **extra):
        return pipe(prompt=[""] * len(prompts), ip_adapter_image=(prompts + 1) / 2, num_inference_steps=10,
                    generator=0, output_type="pt", progress=False, **extra) * 2 - 1

    _, preds = evaluation._features_and_predictions(evaluation.load_classifier(), run(x[:20]))
    assert float((preds == y[:20]).float().mean()) >= 0.9
    order = digit_attributes(x)["mass"].argsort()
    thin, bold = run(x[order[:8]]), run(x[order[-8:]])
    assert digit_attributes(bold)["mass"].mean() > 1.2 * digit_attributes(thin)["mass"].mean()
    base = fastdiff.load("digits-sd")(prompt=["", ""], num_inference_steps=3, generator=0, output_type="pt",
                                       progress=False)
    zero = pipe(prompt=["", ""], ip_adapter_image=(x[:2] + 1) / 2, ip_adapter_scale=0.0, num_inference_steps=3,
                generator=0, output_type="pt", progress=False)
    assert torch.equal(base, zero)


def test_compiled_unet_takes_the_image_branch_too(pipe):
    """After compile() the wrapper runs the compiled UNet with the adapter's tokens set: the same images as eager
    (without an image prompt the compiled UNet is tests/test_controlnet_pipeline.py's case)."""
    latents, images, steps = noise(2), digits(2), 2
    eager = sample(pipe, prompt=["", P0], latents=latents, ip_adapter_image=images, num_inference_steps=steps)
    pipe.compile(freeze=False, backend="aot_eager")
    close(sample(pipe, prompt=["", P0], latents=latents, ip_adapter_image=images, num_inference_steps=steps), eager,
          atol=1e-5)
    assert pipe._compiled.compiles == 1
