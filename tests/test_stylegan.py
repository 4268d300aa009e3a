"""StyleGAN and the GAN losses: mapping and synthesis shapes (both style injections), the equalised learning rate and
the mapping network's lr multiplier against a hand-computed Adam step, style mixing (crossover 0 / num_ws = one w,
per-sample crossovers, training-time mixing), the truncation trick (ψ = 1 untruncated, ψ = 0 the mean-w image),
noise strength 0 = deterministic given w, AdaIN against instance normalisation written here (through the fused
GroupNorm op), the critic's minibatch std, the gradient penalty / R1 / hinge losses against hand computations on toy
critics, WGAN-GP / hinge training steps, save/load, the README figures and ``fastdiff sample --truncation``.

The shipped digits-stylegan is checked at the end (quality figures are in its model card, made by ``fastdiff eval``);
the recipe itself runs for 2 steps in tests/test_training.py with every recipe."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fastdiff
from fastdiff import dispatch, evaluation, training
from fastdiff.models import StyleDiscriminator, StyleGenerator, load_model, losses
from fastdiff.models.gan import EqualLinear
from fastdiff.pipelines import GANPipeline
from tests.test_cli import run_here

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)

TINY = dict(resolution=16, latent_dim=8, w_dim=12, mapping_layers=3, base_channels=4, max_channels=8, channels=1)


def tiny(seed: int = 0, **overrides) -> StyleGenerator:
    """A tiny generator with non-zero noise strengths and random styles (fresh layers start at noise 0 and styles 1,
    which would hide the noise and style paths)."""
    torch.manual_seed(seed)
    g = StyleGenerator(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for layer in g.layers:
            layer.noise_strength.fill_(0.3)
        g.w_avg.normal_()
    return g


def fixed_noise(g: StyleGenerator, batch: int, seed: int = 1, shared: bool = False) -> list[torch.Tensor]:
    """Noise maps drawn with a seeded generator; ``shared``: the same maps for every sample of the batch."""
    if shared:
        return [n.expand(batch, -1, -1, -1) for n in fixed_noise(g, 1, seed)]
    return g.make_noise(batch, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("style", ["modulated", "adain"])
@pytest.mark.parametrize("activation", ["lrelu", "silu"])
def test_mapping_and_synthesis_shapes(style, activation):
    g = tiny(style=style, activation=activation)
    z = torch.randn(3, 8)
    w = g.map(z)
    assert w.shape == (3, 12)
    assert g.num_ws == 6 == len(g.layers) + 1  # 16×16: 5 styled layers + the last ToRGB
    wp = g.broadcast(w)
    assert wp.shape == (3, 6, 12) and torch.equal(wp[:, 4], w)
    with torch.no_grad():
        img = g.synthesis(wp, fixed_noise(g, 3))
    assert img.shape == (3, 1, 16, 16) and torch.isfinite(img).all()
    assert g.noise_shapes(3) == [(3, 1, r, r) for r in (4, 8, 8, 16, 16)]
    # the mapping network's depth is configurable; 8 by default (as in StyleGAN)
    assert len(g.mapping.layers) == 3 and StyleGenerator().config.mapping_layers == 8
    assert len(StyleGenerator(resolution=8, mapping_layers=8).mapping.layers) == 8


def test_forward_is_map_then_synthesis():
    g = tiny()
    z, noise = torch.randn(2, 8), fixed_noise(g, 2)
    with torch.no_grad():
        assert torch.equal(g(z, noise=noise), g.synthesis(g.map(z), noise))
        assert torch.equal(g.synthesis(g.map(z), noise), g.synthesis(g.broadcast(g.map(z)), noise))


def test_mapping_normalises_z_and_uses_fresh_layers():
    g = tiny()
    z = torch.randn(4, 8)
    with torch.no_grad():  # pixel norm: z and 5·z map to the same w
        assert torch.allclose(g.map(z), g.map(5 * z), atol=1e-5)
        # the mapping network by hand: pixel norm, then each layer W·gain·x + b·lr_mul, LeakyReLU(0.2)·√2
        h = z / z.square().mean(1, keepdim=True).add(1e-8).sqrt()
        for layer in g.mapping.layers:
            gain = layer.lr_multiplier / math.sqrt(layer.weight.shape[1])
            h = F.leaky_relu(h @ (layer.weight * gain).t() + layer.bias * layer.lr_multiplier, 0.2) * math.sqrt(2)
        assert torch.allclose(g.map(z), h, atol=1e-5)


def test_lr_multiplier_slows_the_layer_by_that_factor():
    """Equalised learning rate: the effective weights start at the same scale (std 1/√fan_in) whatever the lr
    multiplier, and one Adam step moves the effective weight lr·lr_mul/√fan_in (Adam's first step is lr·sign(g))."""
    torch.manual_seed(0)
    fast, slow = EqualLinear(16, 4, 1.0), EqualLinear(16, 4, 0.01)
    with torch.no_grad():
        slow.weight.copy_(fast.weight / 0.01)  # the same effective weights
    x = torch.randn(32, 16)
    assert torch.allclose(fast(x), slow(x), atol=1e-5)
    moved = []
    for layer in (fast, slow):
        before = layer.weight.detach() * layer.weight_gain
        opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
        layer(x).square().sum().backward()
        opt.step()
        moved.append((layer.weight.detach() * layer.weight_gain - before).abs())
    assert torch.allclose(moved[0], torch.full_like(moved[0], 1e-2 / 4), rtol=1e-3)  # lr / √16
    assert torch.allclose(moved[1], moved[0] * 0.01, rtol=1e-3)
    assert StyleGenerator().config.mapping_lr_multiplier == 0.01
    assert all(layer.lr_multiplier == 0.01 for layer in StyleGenerator(resolution=8).mapping.layers)


# ----------------------------------------------------------------------------------------------- style mixing
def test_mixing_at_crossover_0_and_last_is_one_w():
    g = tiny()
    w1, w2 = g.map(torch.randn(3, 8)), g.map(torch.randn(3, 8))
    noise = fixed_noise(g, 3)
    with torch.no_grad():
        one, two = g.synthesis(w1, noise), g.synthesis(w2, noise)
        assert torch.equal(g.mix(w1, w2, 0, noise), two)  # every row from w2
        assert torch.equal(g.mix(w1, w2, g.num_ws, noise), one)  # every row from w1
        for cut in range(1, g.num_ws):  # a real crossover differs from both
            mixed = g.mix(w1, w2, cut, noise)
            assert not torch.allclose(mixed, one, atol=1e-4) and not torch.allclose(mixed, two, atol=1e-4)


def test_mix_ws_rows_and_per_sample_crossover():
    g = tiny()
    w1, w2 = torch.randn(3, 12), torch.randn(3, 12)
    ws = g.mix_ws(w1, w2, 2)
    assert torch.equal(ws[:, :2], w1[:, None].expand(-1, 2, -1))
    assert torch.equal(ws[:, 2:], w2[:, None].expand(-1, 4, -1))
    cuts = torch.tensor([0, 3, 6])
    per = g.mix_ws(w1, w2, cuts)
    for i, c in enumerate(cuts.tolist()):
        assert torch.equal(per[i], g.mix_ws(w1[i:i + 1], w2[i:i + 1], c)[0])


def test_training_mixing_draws_crossovers_inside_the_layers():
    g = tiny()
    z = torch.randn(64, 8)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(g.mixed_ws(z, 0.0, gen), g.broadcast(g.map(z)))
    ws = g.mixed_ws(z, 1.0, torch.Generator().manual_seed(3))
    w = g.map(z)
    for i in range(64):  # each sample: rows [0, c) are its own w, rows [c, num_ws) one other w, 1 ≤ c < num_ws
        own = (ws[i] == w[i]).all(dim=1)
        c = int(own.long().sum())
        assert 1 <= c < g.num_ws and own[:c].all() and not own[c:].any()
        assert torch.equal(ws[i, c:], ws[i, c:c + 1].expand(g.num_ws - c, -1))
    # with probability 1 − p, a sample keeps its own w throughout (crossover = num_ws)
    z = torch.randn(2000, 8)
    single = (g.mixed_ws(z, 0.5, torch.Generator().manual_seed(5)) == g.map(z)[:, None]).all(dim=(1, 2))
    assert 0.45 < single.float().mean() < 0.55


def test_training_forward_tracks_w_avg_and_eval_does_not():
    g = tiny()
    g.w_avg.zero_()
    g.train()
    z = torch.randn(16, 8)
    g.map(z)
    expected = g.mapping(z).mean(0) * (1 - 0.995)
    assert torch.allclose(g.w_avg, expected, atol=1e-6)
    g.eval()
    before = g.w_avg.clone()
    g.map(torch.randn(16, 8))
    assert torch.equal(g.w_avg, before)


# ----------------------------------------------------------------------------------------------- truncation
def test_truncation_psi_one_is_untruncated_and_zero_is_the_mean_w_image():
    g = tiny()
    z, noise = torch.randn(4, 8), fixed_noise(g, 4, shared=True)
    with torch.no_grad():
        plain = g.synthesis(g.mapping(z), noise)  # MappingNetwork: pixel norm + the MLP
        assert torch.equal(g(z, truncation_psi=1.0, noise=noise), plain)
        mean_image = g.synthesis(g.w_avg.expand(4, -1), noise)
        at_zero = g(z, truncation_psi=0.0, noise=noise)
        assert torch.allclose(at_zero, mean_image, atol=1e-6)
        assert torch.allclose(at_zero[0:1].expand(4, -1, -1, -1), at_zero, atol=1e-6)  # the same for every z
        w = g.map(z)
        assert torch.allclose(g.map(z, 0.7), g.w_avg + 0.7 * (w - g.w_avg), atol=1e-6)
        assert torch.allclose(g.truncate(g.broadcast(w), 0.5), g.broadcast(g.w_avg + 0.5 * (w - g.w_avg)), atol=1e-6)


def test_pipeline_truncation_goes_to_the_generator():
    g = tiny()
    with torch.no_grad():
        for layer in g.layers:
            layer.noise_strength.zero_()
    pipe = GANPipeline(g)
    a = pipe(batch_size=3, generator=0, output_type="pt", progress=False, truncation=0.0)
    assert torch.allclose(a[0], a[1], atol=1e-5) and torch.allclose(a[0], a[2], atol=1e-5)
    b = pipe(batch_size=3, generator=0, output_type="pt", progress=False)  # ψ = 1
    assert not torch.allclose(b[0], b[1], atol=1e-3)


# ----------------------------------------------------------------------------------------------- noise
def test_noise_strength_zero_makes_sampling_deterministic_given_w():
    g = tiny()
    w = g.map(torch.randn(2, 8))
    with torch.no_grad():
        assert not torch.allclose(g.synthesis(w), g.synthesis(w))  # fresh noise each call
        for layer in g.layers:
            layer.noise_strength.zero_()
        assert torch.equal(g.synthesis(w), g.synthesis(w))
        assert torch.equal(g.synthesis(w), g.synthesis(w, fixed_noise(g, 2, seed=7)))


def test_each_layer_reads_its_noise_map_scaled_by_its_strength():
    g = tiny()
    w = g.map(torch.randn(1, 8))
    noise = fixed_noise(g, 1)
    with torch.no_grad():
        base = g.synthesis(w, noise)
        for i in range(g.num_noise_layers):
            changed = [n.clone() for n in noise]
            changed[i] += 1.0
            assert not torch.allclose(g.synthesis(w, changed), base)
            g.layers[i].noise_strength.zero_()
            assert torch.equal(g.synthesis(w, changed), g.synthesis(w, noise))
            g.layers[i].noise_strength.fill_(0.3)


# ----------------------------------------------------------------------------------------------- AdaIN
@pytest.mark.parametrize("activation", ["lrelu", "silu"])
def test_adain_layer_against_instance_norm_written_here(activation):
    torch.manual_seed(0)
    g = tiny(style="adain", activation=activation)
    layer = g.layers[1]  # 4×4 → 8×8 (upsamples)
    with torch.no_grad():
        layer.conv.style.weight.normal_()
    x, w, noise = torch.randn(3, 8, 4, 4), torch.randn(3, 12), torch.randn(3, 1, 8, 8)
    conv = layer.conv
    h = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False), conv.weight * conv.scale,
                 padding=1)
    assert layer.bias is None  # the instance norm would cancel a bias: the style's y_b is the bias
    h = h + layer.noise_strength * noise
    mu, var = h.mean(dim=(2, 3), keepdim=True), h.var(dim=(2, 3), keepdim=True, unbiased=False)
    y = F.linear(w, conv.style.weight * conv.style.weight_gain, conv.style.bias)
    ys, yb = y[:, :8, None, None], y[:, 8:, None, None]
    expected = (1 + ys) * (h - mu) / torch.sqrt(var + 1e-5) + yb
    expected = F.silu(expected) if activation == "silu" else F.leaky_relu(expected, 0.2) * math.sqrt(2)
    with torch.no_grad():
        dispatch.reset_counts()
        out = layer(x, w, noise)
        assert sum(n for (op, _), n in dispatch.counts().items() if op == "group_norm_silu") == 1
    assert torch.allclose(out, expected, atol=1e-4)


# ----------------------------------------------------------------------------------------------- critic and losses
def test_critic_shapes_and_minibatch_std():
    torch.manual_seed(0)
    d = StyleDiscriminator(resolution=16, channels=1, base_channels=4, max_channels=8, mbstd_group=4)
    x = torch.randn(8, 1, 16, 16)
    assert d(x).shape == (8, 1)
    h = torch.randn(8, 8, 4, 4)
    s = d._minibatch_std(h)
    assert s.shape == (8, 1, 4, 4)
    for i in range(8):  # groups of 4: samples i, i + 2, i + 4, i + 6 (i mod 2)
        group = h[i % 2::2]
        assert torch.allclose(s[i], group.std(dim=0, unbiased=False).mean().expand(1, 4, 4), atol=1e-5)
    assert d(x[:3]).shape == (3, 1)  # a batch that 4 does not divide: groups of 3
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, 16, 16\)"):
        d(torch.randn(2, 1, 8, 8))


def test_critic_scores_are_per_sample():
    """No normalisation layer across the batch: a sample's score does not move when another changes (with
    mbstd_group 1), so the per-sample gradient penalties are exact."""
    torch.manual_seed(0)
    d = StyleDiscriminator(resolution=8, channels=1, base_channels=4, max_channels=8, mbstd_group=1)
    x = torch.randn(4, 1, 8, 8)
    y = x.clone()
    y[1:] = torch.randn(3, 1, 8, 8)
    assert torch.allclose(d(x)[0], d(y)[0], atol=1e-6)


def toy_critic(a: torch.Tensor):
    return lambda x: (a * x.square()).flatten(1).sum(1, keepdim=True)  # ∇_x = 2·a·x


def test_gradient_penalty_matches_a_hand_computation():
    torch.manual_seed(0)
    a = torch.rand(1, 2, 3, 3)
    real, fake, eps = torch.randn(5, 2, 3, 3), torch.randn(5, 2, 3, 3), torch.rand(5)
    critic = toy_critic(a)
    x_hat = eps[:, None, None, None] * real + (1 - eps[:, None, None, None]) * fake
    norms = (2 * a * x_hat).flatten(1).norm(dim=1)
    expected = ((norms - 1) ** 2).mean()
    assert torch.allclose(losses.gradient_penalty(critic, real, fake, eps=eps), expected, atol=1e-6)
    # the penalty trains the critic: d/da of Σ over a parameter the critic reads
    a_param = a.clone().requires_grad_(True)
    losses.gradient_penalty(toy_critic(a_param), real, fake, eps=eps).backward()
    a2 = a.clone().requires_grad_(True)
    ((((2 * a2 * x_hat).flatten(1).norm(dim=1) - 1) ** 2).mean()).backward()
    assert torch.allclose(a_param.grad, a2.grad, atol=1e-5)
    # WGAN-GP critic loss: E[D(fake)] − E[D(real)] + λ·GP
    gen = torch.Generator().manual_seed(4)
    eps_drawn = torch.rand(5, generator=torch.Generator().manual_seed(4))
    total = losses.wgan_gp_discriminator_loss(critic, real, fake, gp_weight=10.0, generator=gen)
    wgan = critic(fake).mean() - critic(real).mean()
    assert torch.allclose(total, wgan + 10 * losses.gradient_penalty(critic, real, fake, eps=eps_drawn), atol=1e-5)


def test_r1_and_hinge_match_hand_computations():
    torch.manual_seed(0)
    a, real = torch.rand(1, 1, 4, 4), torch.randn(6, 1, 4, 4)
    expected = (2 * a * real).flatten(1).square().sum(1).mean()
    assert torch.allclose(losses.r1_penalty(toy_critic(a), real), expected, atol=1e-6)
    r, f = torch.tensor([[2.0], [0.5], [-1.0]]), torch.tensor([[-2.0], [0.0], [1.5]])
    # relu(1 − r) = (0, 0.5, 2), mean 2.5/3; relu(1 + f) = (0, 1, 2.5), mean 3.5/3
    assert torch.allclose(losses.hinge_discriminator_loss(r, f), torch.tensor(6.0 / 3))
    assert torch.allclose(losses.hinge_generator_loss(f), torch.tensor(0.5 / 3))  # −mean(−2, 0, 1.5)


@pytest.mark.parametrize("loss", ["bce", "hinge", "wgan-gp"])
def test_gan_training_steps_for_every_loss(loss):
    torch.manual_seed(0)
    g = StyleGenerator(**TINY)
    d = StyleDiscriminator(resolution=16, channels=1, base_channels=4, max_channels=8)
    cfg = training.GANTraining(loss=loss, n_critic=2 if loss == "wgan-gp" else 1, r1_gamma=0.1, r1_every=1,
                               batch_size=8, lr_g=1e-3, lr_d=1e-3, mixing_prob=0.5)
    x = torch.rand(16, 1, 16, 16) * 2 - 1
    seen, calls = [], []
    # each call of D: is D trainable in it (its parameters require grad)?
    d.register_forward_hook(lambda m, args, out: calls.append(next(m.parameters()).requires_grad))
    before_g = [p.detach().clone() for p in g.parameters()]
    before_d = [p.detach().clone() for p in d.parameters()]
    seconds, ema = training.train_gan(g, d, x, 3, 0, False, "t", cfg, callback=lambda k, m: seen.append(k))
    assert seen == [0, 1, 2] and seconds >= 0 and isinstance(ema, StyleGenerator) and not ema.training
    # per generator step: n_critic critic steps of D(real), D(fake) and the penalty's D call (GP or R1), all
    # training D; then one D call for the generator's loss with D frozen
    per_step = [True] * 3 * cfg.n_critic + [False]
    assert calls == per_step * 3
    assert any(not torch.equal(a, b) for a, b in zip(before_g, g.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before_d, d.parameters()))
    assert all(p.requires_grad for p in d.parameters())  # the generator step's freeze is undone
    assert not torch.equal(g.w_avg, torch.zeros(12)) and torch.equal(ema.w_avg, g.w_avg)
    summary = cfg.summary()
    assert summary["loss"] == loss and ("gp_weight" in summary) == (loss == "wgan-gp")


@pytest.mark.parametrize("reuse", [True, False])
def test_reuse_fakes_feeds_one_batch_to_both_steps(reuse):
    """DCGAN's loop (reuse_fakes): the generator step scores the images the discriminator step saw; otherwise it
    draws a fresh batch."""
    from fastdiff.models import DCGANDiscriminator, DCGANGenerator

    torch.manual_seed(0)
    g, d = DCGANGenerator(resolution=16, latent_dim=8, channels=1, width=4), DCGANDiscriminator(
        resolution=16, channels=1, width=4)
    inputs = []
    d.register_forward_hook(lambda m, args, out: inputs.append(args[0].detach().clone()))
    cfg = training.GANTraining(batch_size=4, shift=0, reuse_fakes=reuse)
    training.train_gan(g, d, torch.rand(8, 1, 16, 16) * 2 - 1, 1, 0, False, "t", cfg)
    real, fake_d, fake_g = inputs
    assert torch.equal(fake_d, fake_g) == reuse and not torch.equal(real, fake_d)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"loss": "wasserstein"}, ValueError, "loss must be one of"),
    ({"n_critic": 0}, ValueError, "n_critic"),
    ({"r1_every": 0}, ValueError, "r1_every"),
    ({"batch_size": 1.5}, TypeError, "batch_size"),
    ({"lr_g": -1e-3}, ValueError, "lr_g"),
    ({"lr_d": 0}, ValueError, "lr_d"),
    ({"gp_weight": -1}, ValueError, "gp_weight"),
    ({"shift": -1}, ValueError, "shift"),
    ({"ema_decay": 1.5}, ValueError, "ema_decay"),
    ({"mixing_prob": -0.1}, ValueError, "mixing_prob"),
    ({"betas": (0.5,)}, ValueError, "betas"),
    ({"betas": (0.5, 1.0)}, ValueError, "betas"),
    ({"reuse_fakes": "yes"}, TypeError, "reuse_fakes"),
])
def test_gan_training_settings_are_checked(kwargs, error, match):
    with pytest.raises(error, match=match):
        training.GANTraining(**kwargs)


def test_train_gan_argument_errors():
    g, d = StyleGenerator(**TINY), StyleDiscriminator(resolution=16, channels=1, base_channels=4, max_channels=8)
    before = [p.detach().clone() for p in g.parameters()]
    cfg = training.GANTraining(batch_size=8)
    with pytest.raises(ValueError, match=r"x must be images \(N, C, H, W\) with N ≥ batch_size = 8"):
        training.train_gan(g, d, torch.rand(4, 1, 16, 16), 1, 0, False, "t", cfg)  # would never fill a batch
    with pytest.raises(ValueError, match="steps"):
        training.train_gan(g, d, torch.rand(8, 1, 16, 16), 0, 0, False, "t", cfg)
    with pytest.raises(TypeError, match="cfg must be a GANTraining"):
        training.train_gan(g, d, torch.rand(8, 1, 16, 16), 1, 0, False, "t", {"loss": "bce"})
    assert all(torch.equal(a, b) for a, b in zip(before, g.parameters()))


def test_wgan_gp_dcgan_uses_a_critic_without_batch_norm(tmp_path):
    from fastdiff.models import DCGANDiscriminator
    from fastdiff.nn import GroupNorm

    d = DCGANDiscriminator(resolution=16, channels=1, width=4, norm="layer")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in d.modules())
    assert any(isinstance(m, GroupNorm) for m in d.modules())
    metrics = training.train("digits-dcgan", tmp_path / "w", steps=2, progress=False, loss="wgan-gp")
    assert metrics["loss"] == "wgan-gp" and metrics["n_critic"] == 5 and metrics["betas"] == [0.0, 0.9]
    assert "wgan-gp" in (tmp_path / "w" / "MODEL_CARD.md").read_text()


def test_loss_option_errors(tmp_path):
    with pytest.raises(ValueError, match="loss must be one of"):
        training.train("digits-stylegan", tmp_path / "a", steps=1, progress=False, loss="mse")
    with pytest.raises(ValueError, match="loss: recipe 'digits-ddpm' has no choice of GAN loss"):
        training.train("digits-ddpm", tmp_path / "b", steps=1, progress=False, loss="hinge")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------------------------- API errors
def test_argument_errors():
    g = tiny()
    with pytest.raises(ValueError, match=r"z must have shape \(B, 8\)"):
        g(torch.randn(2, 7))
    with pytest.raises(ValueError, match=r"w must have shape \(B, 12\) or \(B, 6, 12\)"):
        g.synthesis(torch.randn(2, 5, 12))
    with pytest.raises(ValueError, match="w2 must have w1's shape"):
        g.mix_ws(torch.randn(2, 12), torch.randn(3, 12), 1)
    with pytest.raises(ValueError, match="crossover must be ≤ 6, got 7"):
        g.mix_ws(torch.randn(2, 12), torch.randn(2, 12), 7)
    with pytest.raises(TypeError, match="crossover must be an integer"):
        g.mix_ws(torch.randn(2, 12), torch.randn(2, 12), 1.5)
    with pytest.raises(ValueError, match="crossover must be in"):
        g.mix_ws(torch.randn(2, 12), torch.randn(2, 12), torch.tensor([0, 9]))
    with pytest.raises(ValueError, match="crossover must be an int or a \\(2,\\) integer tensor"):
        g.mix_ws(torch.randn(2, 12), torch.randn(2, 12), torch.tensor([0.5, 1.0]))
    with pytest.raises(TypeError, match="truncation_psi"):
        g.map(torch.randn(2, 8), "0.7")
    with pytest.raises(ValueError, match=r"w must have shape \(B, 12\)"):
        g.truncate(torch.randn(2, 5), 0.7)
    with pytest.raises(ValueError, match=r"z must have shape \(B, 8\)"):
        g.mixed_ws([[0.0] * 8], 0.9)
    with pytest.raises(ValueError, match="noise must be a list of 5 tensors"):
        g.synthesis(torch.randn(2, 12), [torch.randn(2, 1, 4, 4)])
    for p in (-0.5, 1.5):
        with pytest.raises(ValueError, match="mixing_prob"):
            g.mixed_ws(torch.randn(2, 8), p)
    with pytest.raises(ValueError, match="style must be one of"):
        StyleGenerator(style="adain2")
    with pytest.raises(ValueError, match="activation must be one of"):
        StyleGenerator(activation="relu")
    with pytest.raises(ValueError, match="mapping_lr_multiplier"):
        StyleGenerator(mapping_lr_multiplier=0)


# ----------------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("style", ["modulated", "adain"])
def test_save_load_round_trip(tmp_path, style):
    g = tiny(style=style)
    d = StyleDiscriminator(resolution=16, channels=1, base_channels=4, max_channels=8)
    g.save_pretrained(tmp_path / "g")
    d.save_pretrained(tmp_path / "d")
    g2, d2 = load_model(tmp_path / "g"), StyleDiscriminator.from_pretrained(tmp_path / "d")
    assert isinstance(g2, StyleGenerator) and g2.config == g.config and torch.equal(g2.w_avg, g.w_avg)
    z, noise, x = torch.randn(2, 8), fixed_noise(g, 2), torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(g2.eval()(z, 0.7, noise), g(z, 0.7, noise))
        assert torch.equal(d2(x), d(x))
    pipe = GANPipeline(g)
    pipe.save_pretrained(tmp_path / "p")
    again = fastdiff.load(tmp_path / "p")
    a = pipe(batch_size=2, generator=3, output_type="pt", progress=False, truncation=0.5)
    b = again(batch_size=2, generator=3, output_type="pt", progress=False, truncation=0.5)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------- figures and CLI
def test_style_mixing_grid_and_truncation_strip(tmp_path):
    g = tiny()
    pipe = GANPipeline(g)
    path = evaluation.style_mixing_grid(pipe, tmp_path / "mix.png", num=3, scale=1)
    grid = np.asarray(Image.open(path))
    cell = 16 + 2
    assert grid.shape[0] == 4 * cell + 2  # a header row of B sources and 3 rows of A
    # the cell (A1, B1) is mix(A1, B1): rebuild it from the same draws
    gen = torch.Generator().manual_seed(0)
    w_a, noise = evaluation._ws_and_noise(g, 3, gen)
    w_b, _ = evaluation._ws_and_noise(g, 3, gen)
    with torch.no_grad():
        expected = evaluation._to_pixels(g.mix(w_a[:1], w_b[:1], g.num_ws // 2, noise))[0]
    x0 = grid.shape[1] - 4 * cell + cell  # the label column, then the A column: x of column 1
    top = 2 + cell
    assert np.abs(grid[top:top + 16, x0:x0 + 16].astype(int) - expected).max() <= 1  # (batch-size rounding)
    strip = evaluation.truncation_strip(pipe, tmp_path / "t.png", num=2, psis=(0.0, 1.0), scale=1)
    img = np.asarray(Image.open(strip))
    assert img.shape[0] == 2 * cell + 2
    x0 = img.shape[1] - 2 * cell  # column 0 (ψ = 0) is the same image in both rows
    assert np.array_equal(img[2:18, x0:x0 + 16], img[2 + cell:18 + cell, x0:x0 + 16])
    assert not np.array_equal(img[2:18, x0 + cell:x0 + cell + 16], img[2 + cell:18 + cell, x0 + cell:x0 + cell + 16])
    with pytest.raises(ValueError, match="pipe must hold a StyleGenerator"):
        evaluation.style_mixing_grid(fastdiff.load("digits-dcgan"), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_cli_truncation(tmp_path, capsys):
    out = tmp_path / "s.png"
    r = run_here(capsys, "sample", "--model", "digits-stylegan", "--num", "4", "--truncation", "0.7",
                 "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "truncation ψ = 0.7" in r.stdout and Image.open(out).size[0] > 0
    r = run_here(capsys, "sample", "--model", "digits-dcgan", "--truncation", "0.7", "--out", str(tmp_path / "d.png"))
    assert r.returncode == 2 and "--truncation: model 'digits-dcgan' has no mapping network" in r.stderr
    r = run_here(capsys, "sample", "--model", "digits-stylegan", "--truncation", "nan", "--out",
                 str(tmp_path / "n.png"))
    assert r.returncode == 2 and "--truncation must be a finite number" in r.stderr
    r = run_here(capsys, "train", "digits-ddpm", "--loss", "hinge", "--out", str(tmp_path / "t"))
    assert r.returncode == 2 and "--loss: recipe 'digits-ddpm' is not a GAN recipe" in r.stderr
    assert not any(p.name in ("d.png", "n.png", "t") for p in tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------- shipped model
def test_shipped_stylegan():
    pipe = fastdiff.load("digits-stylegan")
    g = pipe.generator
    assert isinstance(g, StyleGenerator) and g.config.mapping_layers == 8 and g.config.style == "modulated"
    assert g.w_avg.abs().sum() > 0  # tracked in training
    assert any(float(layer.noise_strength.detach()) != 0 for layer in g.layers)  # the noise inputs were learned
    images = pipe(batch_size=4, generator=0, output_type="pt", progress=False, truncation=0.7)
    assert images.shape == (4, 1, 16, 16) and torch.isfinite(images).all()
