"""TextToImagePipeline: classifier-free guidance with negative prompts against a plain two-pass DDIM loop written
here, prompt embeds / images per prompt / class-label shorthand, cross-attention and the guided DDIM step through
fastdiff's ops, argument errors before any work, truncation and unknown words, save/load, and the digits-sd recipe."""

from __future__ import annotations

import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
from model_factories import tiny_text_pipeline

import fastdiff
from fastdiff import dispatch, ops
from fastdiff.models import TextEncoder, WordTokenizer
from fastdiff.models.text_encoder import UNK_ID
from fastdiff.pipelines import TextToImagePipeline

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4
LATENT = (2, 8, 8)  # the tiny pipeline's latents (C, h, w); images are 1×16×16
P0, P1 = "a bold seven", "the digit 3, slanted left"
N0, N1 = "thin", "slanted right"


@pytest.fixture
def pipe():
    return tiny_text_pipeline(seed=0)


def noise(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, *LATENT, generator=torch.Generator().manual_seed(seed))


def sample(pipe, **kwargs) -> torch.Tensor:
    kwargs.setdefault("num_inference_steps", STEPS)
    return pipe(output_type="pt", progress=False, **kwargs)


def encode(pipe, prompts) -> torch.Tensor:
    """The text encoder's last hidden state of ``prompts``, straight from the components."""
    with torch.no_grad():
        tokens = pipe.tokenizer(list(prompts))
        return pipe.text_encoder(tokens["input_ids"], tokens["attention_mask"]).last_hidden_state


@torch.no_grad()
def ddim_reference(pipe, cond, uncond, scale: float, latents: torch.Tensor, eps_fn, steps: int = STEPS):
    """A plain guided sampler: ``eps_fn(x, t_batch, context, unconditional)`` → ε, called separately on the prompt
    states ``cond`` and (unless ``uncond`` is None) the negative states ``uncond``, uncond + s·(cond − uncond), and
    deterministic DDIM (η = 0, ε-prediction, no clipping, ᾱ = 1 after the last step) written out in float64 from
    the linear β schedule; the VAE decodes latents / scaling_factor; images mapped [−1, 1] → [0, 1]."""
    cfg = pipe.scheduler.config
    assert cfg["beta_schedule"] == "linear" and cfg["prediction_type"] == "epsilon"
    assert not cfg["clip_sample"] and not cfg["thresholding"] and cfg["set_alpha_to_one"]
    T = cfg["num_train_timesteps"]
    betas = np.linspace(cfg["beta_start"], cfg["beta_end"], T, dtype=np.float64)
    alphas_cumprod = np.cumprod(1.0 - betas)
    np.testing.assert_allclose(pipe.scheduler.alphas_cumprod.double().numpy(), alphas_cumprod, rtol=1e-5)
    pipe.scheduler.set_timesteps(steps)
    timesteps = pipe.scheduler.timesteps.tolist()
    assert len(timesteps) == steps and timesteps == sorted(timesteps, reverse=True)
    x = latents.double()
    for t in timesteps:
        t_batch = torch.full((x.shape[0],), float(t))
        eps = eps_fn(x.float(), t_batch, cond, False).double()
        if uncond is not None:
            eps_uncond = eps_fn(x.float(), t_batch, uncond, True).double()
            eps = eps_uncond + scale * (eps - eps_uncond)
        prev = t - T // steps
        a_t = float(alphas_cumprod[t])
        a_prev = float(alphas_cumprod[prev]) if prev >= 0 else 1.0
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    images = pipe.vae.decode(x.float() / pipe.vae.config.scaling_factor)
    return (images / 2 + 0.5).clamp(0, 1)


def reference_sample(pipe, prompts, negatives, scale: float, latents: torch.Tensor, steps: int = STEPS):
    """:func:`ddim_reference` with the UNet alone, on the prompts and the negative prompts."""
    cond = encode(pipe, prompts)
    uncond = encode(pipe, negatives) if scale != 1.0 else None
    return ddim_reference(pipe, cond, uncond, scale, latents, lambda x, t, c, _: pipe.unet(x, t, context=c), steps)


def close(a, b, atol=1e-4):
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


def differ(a, b, by=1e-3):
    assert (a - b).abs().max() > by, "the two runs should give visibly different images"


class Calls:
    """Forward pre-hooks on the pipeline's models: the batch size of every call, per model (the VAE's: its decoder,
    which ``vae.decode`` runs; a ControlNet's when one is attached)."""

    def __init__(self, pipe):
        modules = {"unet": pipe.unet, "vae": pipe.vae.decoder, "text_encoder": pipe.text_encoder}
        if getattr(pipe, "controlnet", None) is not None:
            modules["controlnet"] = pipe.controlnet
        self.log = {name: [] for name in modules}
        self.handles = [module.register_forward_pre_hook(
            lambda module, args, name=name: self.log[name].append(args[0].shape[0]))
            for name, module in modules.items()]

    def remove(self):
        for h in self.handles:
            h.remove()

    def any(self) -> bool:
        return any(self.log.values())


# ------------------------------------------------------------------------------------- 1. guidance vs a plain loop
def test_cfg_with_negative_prompts_matches_a_plain_two_pass_loop(pipe):
    latents = noise(2)
    ref = reference_sample(pipe, [P0, P1], [N0, N1], 3.0, latents)
    calls = Calls(pipe)
    out = sample(pipe, prompt=[P0, P1], negative_prompt=[N0, N1], guidance_scale=3.0, latents=latents)
    assert out.shape == (2, 1, 16, 16) and out.dtype == torch.float32
    close(out, ref)
    # one batched [uncond; cond] UNet call per step
    assert calls.log["unet"] == [4] * STEPS
    # the negatives are paired with their own prompt: swapping them changes the images
    differ(out, sample(pipe, prompt=[P0, P1], negative_prompt=[N1, N0], guidance_scale=3.0, latents=latents))
    # guidance is not a no-op here (so the comparisons above can fail)
    differ(out, reference_sample(pipe, [P0, P1], None, 1.0, latents))


def test_one_negative_str_is_used_for_every_prompt(pipe):
    latents = noise(2)
    out = sample(pipe, prompt=[P0, P1], negative_prompt=N0, guidance_scale=3.0, latents=latents)
    close(out, reference_sample(pipe, [P0, P1], [N0, N0], 3.0, latents))


def test_default_negative_is_the_encoded_empty_prompt(pipe):
    latents = noise(2)
    out = sample(pipe, prompt=[P0, P1], guidance_scale=3.0, latents=latents)
    close(out, reference_sample(pipe, [P0, P1], ["", ""], 3.0, latents))
    torch.testing.assert_close(out, sample(pipe, prompt=[P0, P1], negative_prompt="", guidance_scale=3.0,
                                           latents=latents), rtol=0, atol=1e-6)
    # not the base pipeline's default (a zero context), not a real negative prompt
    zeros = torch.zeros(2, pipe.tokenizer.max_length, pipe.unet.config.context_dim)
    differ(out, sample(pipe, prompt_embeds=encode(pipe, [P0, P1]), negative_prompt_embeds=zeros,
                       guidance_scale=3.0, latents=latents))
    differ(out, sample(pipe, prompt=[P0, P1], negative_prompt=N0, guidance_scale=3.0, latents=latents))


def test_guidance_scale_one_is_the_conditional_model_alone(pipe):
    latents = noise(2)
    calls = Calls(pipe)
    out = sample(pipe, prompt=[P0, P1], guidance_scale=1.0, latents=latents)
    assert calls.log["unet"] == [2] * STEPS  # one conditional pass per step, no unconditional half
    close(out, reference_sample(pipe, [P0, P1], None, 1.0, latents))


def test_defaults_come_from_the_settings(pipe):
    # the tiny pipeline's settings: 4 steps, guidance 3
    latents = noise(1)
    calls = Calls(pipe)
    out = pipe(prompt=P0, latents=latents, output_type="pt", progress=False)
    assert calls.log["unet"] == [2] * 4
    close(out, reference_sample(pipe, [P0], [""], 3.0, latents, steps=4))


# ------------------------------------------------------------------------------------- 2. embeds, images per prompt
def test_prompt_embeds_give_the_images_of_their_prompts(pipe):
    a = sample(pipe, prompt=[P0, P1], generator=0)
    b = sample(pipe, prompt_embeds=encode(pipe, [P0, P1]), generator=0)
    close(a, b, atol=1e-6)
    differ(a, sample(pipe, prompt_embeds=encode(pipe, [P1, P0]), generator=0))
    # encode_prompt is what the pipeline's own embeds are
    torch.testing.assert_close(pipe.encode_prompt([P0, P1]), encode(pipe, [P0, P1]), rtol=0, atol=0)


def test_negative_prompt_embeds_give_the_images_of_their_prompts(pipe):
    a = sample(pipe, prompt=[P0, P1], negative_prompt=[N0, N1], guidance_scale=3.0, generator=0)
    b = sample(pipe, prompt_embeds=encode(pipe, [P0, P1]), negative_prompt_embeds=encode(pipe, [N0, N1]),
               guidance_scale=3.0, generator=0)
    close(a, b, atol=1e-6)
    # with prompt_embeds alone the negative side is still the encoded empty prompt
    c = sample(pipe, prompt_embeds=encode(pipe, [P0, P1]), guidance_scale=3.0, generator=0)
    close(c, sample(pipe, prompt=[P0, P1], guidance_scale=3.0, generator=0), atol=1e-6)
    differ(a, c)


def test_num_images_per_prompt_keeps_each_prompts_images_together(pipe):
    a = sample(pipe, prompt=[P0, P1], negative_prompt=[N0, N1], guidance_scale=3.0, num_images_per_prompt=2,
               generator=0)
    assert a.shape == (4, 1, 16, 16)
    b = sample(pipe, prompt=[P0, P0, P1, P1], negative_prompt=[N0, N0, N1, N1], guidance_scale=3.0, generator=0)
    close(a, b, atol=1e-6)
    c = sample(pipe, prompt_embeds=encode(pipe, [P0, P1]), num_images_per_prompt=2, generator=0)
    close(c, sample(pipe, prompt=[P0, P0, P1, P1], generator=0), atol=1e-6)
    differ(a, sample(pipe, prompt=[P0, P1, P0, P1], negative_prompt=[N0, N1, N0, N1], guidance_scale=3.0,
                     generator=0))


def test_class_labels_stand_for_the_digit_prompts(pipe):
    close(sample(pipe, class_labels=[3, 7, 0], generator=0), sample(pipe, prompt=["3", "7", "0"], generator=0),
          atol=1e-6)
    close(sample(pipe, class_labels=torch.tensor([9, 2]), generator=0), sample(pipe, prompt=["9", "2"], generator=0),
          atol=1e-6)
    five = sample(pipe, class_labels=5, batch_size=3, generator=0)
    assert five.shape == (3, 1, 16, 16)
    close(five, sample(pipe, prompt=["5"] * 3, generator=0), atol=1e-6)
    assert sample(pipe, class_labels=4, generator=0).shape == (1, 1, 16, 16)
    latents = noise(1)
    differ(sample(pipe, class_labels=[3], latents=latents), sample(pipe, class_labels=[8], latents=latents))


# ------------------------------------------------------------------------------------- 3. through fastdiff's ops
def test_cross_attention_and_the_guided_ddim_step_run_through_fastdiff_ops(pipe, monkeypatch):
    attention_calls, step_calls = [], []
    attention, ddim_step = ops.attention, ops.ddim_step

    def recording_attention(q, k, v, **kwargs):
        attention_calls.append((tuple(q.shape), tuple(k.shape)))
        return attention(q, k, v, **kwargs)

    def recording_ddim_step(x, model_output, *args, **kwargs):
        step_calls.append((x.shape[0], model_output.shape[0], kwargs.get("guidance_scale")))
        return ddim_step(x, model_output, *args, **kwargs)

    monkeypatch.setattr(ops, "attention", recording_attention)
    monkeypatch.setattr(ops, "ddim_step", recording_ddim_step)
    cross_blocks = [name for name, _ in pipe.unet.named_modules() if name.endswith(".attn2")]
    assert cross_blocks, "the tiny UNet should cross-attend"
    m = pipe.tokenizer.max_length
    dispatch.reset_counts()
    sample(pipe, prompt=[P0, P1], negative_prompt=[N0, N1], guidance_scale=3.0, generator=0)
    counts = dispatch.counts()

    def total(op):
        return sum(v for (name, _), v in counts.items() if name == op)

    # every attention call went through the dispatched op (UNet self- and cross-attention, the VAE's mid block)
    assert total("attention") == len(attention_calls) > 0, counts
    cross = [(q, k) for q, k in attention_calls if k[2] != q[2]]
    assert len(cross) == len(cross_blocks) * STEPS
    assert all(k[2] == m and k[0] == q[0] == 4 for q, k in cross), cross  # keys: the max_length tokens, 2B rows
    assert any(k[2] == q[2] for q, k in attention_calls)  # self-attention too
    # one fused DDIM step per sampling step, with the guidance combine inside it ([uncond; cond] in, B out)
    assert total("ddim_step") == STEPS == len(step_calls), counts
    assert step_calls == [(2, 4, 3.0)] * STEPS
    if dispatch.interpret_enabled() and os.environ.get("FASTDIFF_BACKEND", "auto") == "auto":
        # CPU tensors under TRITON_INTERPRET=1 take the GPU path's Triton kernels: the fused attention (cross
        # included) and the fused guided DDIM step report the "interpreter" backend
        assert counts.get(("attention", "interpreter"), 0) == total("attention"), counts
        assert counts.get(("ddim_step", "interpreter"), 0) == STEPS, counts

    attention_calls.clear(), step_calls.clear()
    dispatch.reset_counts()
    sample(pipe, prompt=[P0, P1], guidance_scale=1.0, generator=0)
    assert step_calls == [(2, 2, None)] * STEPS  # no guidance: the conditional batch alone
    assert sum(v for (name, _), v in dispatch.counts().items() if name == "ddim_step") == STEPS


# ------------------------------------------------------------------------------------- 4. bad input, before any work
def _embeds(b, m=8, d=16, dtype=torch.float32):
    return torch.randn(b, m, d).to(dtype)


BAD_TEXT = [  # (kwargs, error, the argument the message names) — checked before the text encoder runs
    ({"prompt": []}, ValueError, "prompt"),
    ({"prompt": ["3", 7]}, TypeError, "prompt"),
    ({"prompt": 3}, TypeError, "prompt"),
    ({}, ValueError, "prompt"),
    ({"prompt": "3", "prompt_embeds": _embeds(1)}, ValueError, "prompt_embeds"),
    ({"prompt": "3", "class_labels": 3}, ValueError, "class_labels"),
    ({"prompt": ["3", "4"], "negative_prompt": ["a", "bold", "thin"], "guidance_scale": 3.0}, ValueError,
     "negative_prompt"),
    ({"prompt": ["3", "4"], "negative_prompt": ["thin"], "guidance_scale": 3.0}, ValueError, "negative_prompt"),
    ({"prompt": "3", "negative_prompt": [], "guidance_scale": 3.0}, ValueError, "negative_prompt"),
    ({"prompt": "3", "negative_prompt": [None], "guidance_scale": 3.0}, TypeError, "negative_prompt"),
    ({"prompt": "3", "negative_prompt": "thin", "guidance_scale": 1.0}, ValueError, "negative_prompt"),
    ({"prompt_embeds": _embeds(1), "negative_prompt_embeds": _embeds(1), "guidance_scale": 1.0}, ValueError,
     "negative_prompt"),
    ({"prompt_embeds": _embeds(1), "negative_prompt": "thin", "negative_prompt_embeds": _embeds(1)}, ValueError,
     "negative_prompt_embeds"),
    ({"prompt_embeds": _embeds(1, d=15)}, ValueError, "prompt_embeds"),
    ({"prompt_embeds": torch.randn(8, 16)}, ValueError, "prompt_embeds"),
    ({"prompt_embeds": _embeds(0)}, ValueError, "prompt_embeds"),
    ({"prompt_embeds": _embeds(1, dtype=torch.int64)}, TypeError, "prompt_embeds"),
    ({"prompt_embeds": [[0.0] * 16] * 8}, TypeError, "prompt_embeds"),
    ({"prompt_embeds": _embeds(2), "negative_prompt_embeds": _embeds(1)}, ValueError, "negative_prompt_embeds"),
    ({"prompt_embeds": _embeds(1), "negative_prompt_embeds": _embeds(1, d=15)}, ValueError,
     "negative_prompt_embeds"),
    ({"prompt": "3", "negative_prompt_embeds": _embeds(1)}, ValueError, "negative_prompt_embeds"),
    # under guidance the default negative is the encoded "" (max_length tokens): 5-token embeds cannot pair with it
    ({"prompt_embeds": _embeds(2, m=5), "guidance_scale": 3.0}, ValueError, "prompt_embeds"),
    ({"prompt": "3", "num_images_per_prompt": 0}, ValueError, "num_images_per_prompt"),
    ({"prompt": "3", "num_images_per_prompt": 1.5}, TypeError, "num_images_per_prompt"),
    ({"prompt": "3", "batch_size": 2}, ValueError, "batch_size"),
    ({"class_labels": 10}, ValueError, "class_labels"),
    ({"class_labels": [3, -1]}, ValueError, "class_labels"),
    ({"class_labels": [1.0]}, ValueError, "class_labels"),
    ({"class_labels": []}, ValueError, "class_labels"),
    ({"class_labels": [1, 2], "batch_size": 3}, ValueError, "class_labels"),
    ({"class_labels": 3, "batch_size": 0}, ValueError, "batch_size"),
    ({"prompt": "3", "guidance_scale": "3"}, TypeError, "guidance_scale"),
]


@pytest.mark.parametrize("kwargs, error, name", BAD_TEXT, ids=[f"{i}-{c[2]}" for i, c in enumerate(BAD_TEXT)])
def test_bad_arguments_are_refused_before_any_work(pipe, kwargs, error, name):
    calls = Calls(pipe)
    with pytest.raises(error, match=rf"(^|\W){name}\b") as info:
        pipe(progress=False, **kwargs)
    assert calls.log == {"unet": [], "vae": [], "text_encoder": []}, (info.value, calls.log)


def test_the_embeds_token_count_error_names_prompt_embeds(pipe):
    # not negative_prompt_embeds, which the caller did not pass
    with pytest.raises(ValueError, match="^prompt_embeds has 5 tokens"):
        pipe(prompt_embeds=_embeds(2, m=5), guidance_scale=3.0, progress=False)
    # without guidance any token count pairs with nothing: fine
    assert sample(pipe, prompt_embeds=_embeds(2, m=5), guidance_scale=1.0, generator=0).shape == (2, 1, 16, 16)


@pytest.mark.parametrize("kwargs, name", [
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"output_type": "jpg"}, "output_type"),
    ({"latents": torch.zeros(2, *LATENT)}, "latents"),  # one prompt: batch 1
])
def test_sampler_arguments_are_refused_before_sampling(pipe, kwargs, name):
    calls = Calls(pipe)
    with pytest.raises(ValueError, match=rf"(^|\W){name}\b"):
        pipe(prompt="3", progress=False, **kwargs)
    assert calls.log["unet"] == [] and calls.log["vae"] == []


# ------------------------------------------------------------------------------------- documented prompt handling
def test_long_prompts_are_truncated_with_a_warning(pipe):
    words = ["the", "digit", "seven", ",", "slanted", "right", "and", "bold"]
    limit = pipe.tokenizer.max_length - 2  # BOS and EOS
    assert len(words) > limit
    latents = noise(1)
    with pytest.warns(UserWarning, match="truncated"):
        long = sample(pipe, prompt=" ".join(words), latents=latents)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the truncated prompt itself fits: no warning
        short = sample(pipe, prompt=" ".join(words[:limit]), latents=latents)
    close(long, short, atol=1e-6)
    differ(short, sample(pipe, prompt=" ".join(words[:limit - 1]), latents=latents), by=1e-4)


def test_unknown_words_warn_once_and_become_unk(pipe):
    latents = noise(1)
    with pytest.warns(UserWarning, match="'zebra'"):
        zebra = sample(pipe, prompt="a zebra seven", latents=latents)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        again = sample(pipe, prompt="a zebra seven", latents=latents)
    assert not [w for w in seen if "zebra" in str(w.message)], "an unknown word warns once"
    close(zebra, again, atol=0)
    with pytest.warns(UserWarning, match="'giraffe'"):
        giraffe = sample(pipe, prompt="a giraffe seven", latents=latents)
    close(zebra, giraffe, atol=1e-6)  # both are [UNK] at position 2
    assert pipe.tokenizer(["a zebra seven"])["input_ids"][0, 2] == UNK_ID
    differ(zebra, sample(pipe, prompt="a bold seven", latents=latents), by=1e-4)


# ------------------------------------------------------------------------------------- 5. save / load
def test_save_and_load_round_trip(pipe, tmp_path):
    kw = dict(prompt=[P0, "a zebra 4"], negative_prompt=N0, guidance_scale=2.5, generator=3)
    with pytest.warns(UserWarning, match="zebra"):
        before = sample(pipe, **kw)
    pipe.save_pretrained(tmp_path / "t2i")
    saved = json.loads((tmp_path / "t2i" / "tokenizer" / "tokenizer.json").read_text())
    assert saved["vocabulary"] == pipe.tokenizer.vocabulary and saved["max_length"] == pipe.tokenizer.max_length

    loaded = fastdiff.load(tmp_path / "t2i")
    assert type(loaded) is TextToImagePipeline
    assert isinstance(loaded.tokenizer, WordTokenizer) and isinstance(loaded.text_encoder, TextEncoder)
    assert loaded.tokenizer.vocabulary == pipe.tokenizer.vocabulary
    assert loaded.tokenizer.max_length == pipe.tokenizer.max_length
    assert loaded.settings["default_steps"] == 4 and loaded.settings["default_guidance_scale"] == 3.0
    with pytest.warns(UserWarning, match="zebra"):
        after = sample(loaded, **kw)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    # the defaults (4 steps, guidance 3) survive too
    latents = noise(1)
    torch.testing.assert_close(loaded(prompt=P1, latents=latents, output_type="pt", progress=False),
                               pipe(prompt=P1, latents=latents, output_type="pt", progress=False), rtol=0, atol=0)

    tok = WordTokenizer.from_pretrained(tmp_path / "t2i" / "tokenizer")
    prompts = ["the digit 7, slanted right", "a zebra 3", ""]
    with pytest.warns(UserWarning, match="zebra"):  # a fresh tokenizer warns again
        encoded = tok(prompts)
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(encoded[key], pipe.tokenizer(prompts)[key])


# ------------------------------------------------------------------------------------- 6. the digits-sd recipe
@pytest.mark.slow  # ~10 s: 1 contrastive step + 4 UNet steps (steps // 4 contrastive steps, at least 1)
def test_digits_sd_recipe_trains_a_loadable_text_to_image_folder(tmp_path):
    pytest.importorskip("sklearn")
    from fastdiff import training

    steps = 4
    metrics = training.train("digits-sd", tmp_path / "sd", steps=steps, progress=False)
    folder = tmp_path / "sd"
    saved = json.loads((folder / "train_metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert set(saved) == {
        "train_seconds", "text_encoder_steps", "text_encoder_seconds", "clip_batch_size", "clip_logit_scale",
        "zero_shot_digit_accuracy", "unet_steps", "unet_lr", "prompt_dropout", "warm_started_tensors", "parameters",
        "vocabulary_size", "max_length", "attribute_thresholds", "recipe", "seed", "torch", "threads"}
    assert saved["recipe"] == "digits-sd" and saved["unet_steps"] == steps and saved["text_encoder_steps"] == 1
    assert 0.0 <= saved["zero_shot_digit_accuracy"] <= 1.0
    card = (folder / "MODEL_CARD.md").read_text()
    assert card.startswith("# digits-sd") and "## Prompts" in card and "CPU time" in card

    pipe = fastdiff.load(folder)
    assert type(pipe) is TextToImagePipeline
    assert saved["max_length"] == pipe.tokenizer.max_length == pipe.text_encoder.config.max_length
    assert saved["vocabulary_size"] == len(pipe.tokenizer.vocabulary)
    assert saved["parameters"] == sum(p.numel() for m in (pipe.unet, pipe.vae, pipe.text_encoder)
                                      for p in m.parameters())
    images = pipe(prompt=["a bold 3", "the digit seven, slanted left"], num_inference_steps=2, generator=0,
                  output_type="np", progress=False)
    assert images.shape == (2, 16, 16, 1) and np.isfinite(images).all() and 0 <= images.min() <= images.max() <= 1

    # the text encoder is stage 1's: the seed-0 init after exactly one Adam step (each weight moves by at most the
    # learning rate, most by about that much), then frozen — the UNet stage would have moved it further
    torch.manual_seed(0)
    init = TextEncoder(max_length=pipe.tokenizer.max_length).state_dict()
    trained = pipe.text_encoder.state_dict()
    assert trained.keys() == init.keys()
    lr = training.SD_CLIP_LR
    moved = total = 0
    for name, value in init.items():
        delta = (trained[name] - value).abs()
        assert delta.max() <= lr * 1.001, name
        moved += int((delta > 0.5 * lr).sum())
        total += delta.numel()
    assert moved > 0.9 * total, (moved, total)

    # the UNet was warm-started from digits-ldm's wherever names and shapes match, then trained a little: every
    # shared tensor moved, none by more than the 4 steps' learning rates allow
    base = fastdiff.load("digits-ldm").unet.state_dict()
    unet = pipe.unet.state_dict()
    shared = [k for k in unet if k in base and base[k].shape == unet[k].shape]
    assert len(shared) == saved["warm_started_tensors"] and "conv_in.weight" in shared
    assert any(k.endswith("attn2.to_k.weight") for k in unet) and not any(k.endswith("attn2.to_k.weight") for k in base)
    for k in shared:
        assert (unet[k] - base[k]).abs().max() <= steps * training.SD_LR, k
    conv_in = (unet["conv_in.weight"] - base["conv_in.weight"]).abs()
    assert 0 < conv_in.max() <= steps * training.SD_LR
    assert not any(torch.equal(unet[k], base[k]) for k in shared if unet[k].is_floating_point())
