"""fastdiff.models.losses on hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastdiff.models import losses as L

AC = torch.tensor([0.25, 0.64, 0.81])  # ᾱ_t: √ᾱ = 0.5, 0.8, 0.9; √(1 − ᾱ) = √0.75, 0.6, √0.19


# --------------------------------------------------------------------------------------------- DDPM
def test_q_sample_known_values():
    x0 = torch.tensor([[2.0, -1.0], [4.0, 0.0]])
    noise = torch.tensor([[1.0, 1.0], [-0.5, 2.0]])
    t = torch.tensor([0, 1])
    x_t = L.q_sample(x0, t, noise, AC)
    expected = torch.tensor([[0.5 * 2 + math.sqrt(0.75), -0.5 + math.sqrt(0.75)], [0.8 * 4 - 0.3, 1.2]])
    torch.testing.assert_close(x_t, expected)


class Recorder(torch.nn.Module):
    """A fake model returning a constant prediction and recording its arguments."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value, self.calls = value, []

    def forward(self, x_t, t, **cond):
        self.calls.append((x_t, t, cond))
        return self.value


def test_ddpm_loss_epsilon_sample_v():
    x0 = torch.ones(2, 1, 2, 2)
    noise = torch.full((2, 1, 2, 2), 2.0)
    t = torch.tensor([0, 2])
    zero = Recorder(torch.zeros(2, 1, 2, 2))
    # ε-target: mean(ε²) = 4
    assert L.ddpm_loss(zero, x0, t, noise, AC, class_labels=torch.tensor([1, 2])).item() == pytest.approx(4.0)
    x_t, t_seen, cond = zero.calls[0]
    torch.testing.assert_close(x_t, L.q_sample(x0, t, noise, AC))
    assert torch.equal(t_seen, t) and torch.equal(cond["class_labels"], torch.tensor([1, 2]))
    # x0-target: mean(x0²) = 1
    assert L.ddpm_loss(zero, x0, t, noise, AC, prediction_type="sample").item() == pytest.approx(1.0)
    # v = √ᾱ·ε − √(1 − ᾱ)·x0: sample 0: 0.5·2 − √0.75; sample 1: 0.9·2 − √0.19
    v0, v1 = 1.0 - math.sqrt(0.75), 1.8 - math.sqrt(0.19)
    expected = (v0**2 + v1**2) / 2
    assert L.ddpm_loss(zero, x0, t, noise, AC, prediction_type="v_prediction").item() == pytest.approx(expected)
    # a perfect model has zero loss
    target = L.ddpm_target(x0, t, noise, AC, "v_prediction")
    assert L.ddpm_loss(Recorder(target), x0, t, noise, AC, prediction_type="v_prediction").item() == 0.0


def test_ddpm_loss_draws_noise_and_trains_a_unet():
    from fastdiff.models import UNet

    torch.manual_seed(0)
    unet = UNet(base_channels=8, channel_mult=(1,), layers_per_block=1, attention_levels=(), norm_num_groups=4,
                mid_attention=False, num_classes=2)
    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 100), 0)
    loss = L.ddpm_loss(unet, torch.randn(2, 3, 4, 4), torch.tensor([5, 90]), None, ac,
                       class_labels=torch.tensor([0, 1]))
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss) and unet.conv_in.weight.grad is not None


@pytest.mark.parametrize("kwargs, match", [
    ({"prediction_type": "x0"}, "prediction_type"),
    ({"t": torch.tensor([0.0, 1.0])}, "integer tensor"),
    ({"t": torch.tensor([0])}, r"shape \(2,\)"),
    ({"t": torch.tensor([0, 3])}, r"values in \[0, 3\)"),
    ({"noise": torch.zeros(3, 2)}, "noise must have"),
])
def test_ddpm_loss_errors(kwargs, match):
    args = {"t": torch.tensor([0, 1]), "noise": torch.zeros(2, 2), "prediction_type": "epsilon", **kwargs}
    with pytest.raises(ValueError, match=match):
        L.ddpm_loss(lambda x, t: x, torch.zeros(2, 2), args["t"], args["noise"], AC,
                    prediction_type=args["prediction_type"])


# --------------------------------------------------------------------------------------------- VAE / VQ
def test_gaussian_kl_closed_form():
    assert torch.equal(L.gaussian_kl(torch.zeros(5), torch.zeros(5)), torch.zeros(5))  # KL(N(0,1) ‖ N(0,1)) = 0
    torch.testing.assert_close(L.gaussian_kl(torch.ones(5), torch.zeros(5)), torch.full((5,), 0.5))  # μ = 1
    lv = torch.tensor([math.log(2.0)])
    torch.testing.assert_close(L.gaussian_kl(torch.zeros(1), lv), torch.tensor([0.5 * (2 - 1 - math.log(2))]))


def test_gaussian_kl_matches_torch_distributions():
    mu, lv = torch.randn(4, 3), torch.randn(4, 3)
    q = torch.distributions.Normal(mu, (0.5 * lv).exp())
    p = torch.distributions.Normal(torch.zeros(4, 3), torch.ones(4, 3))
    torch.testing.assert_close(L.gaussian_kl(mu, lv), torch.distributions.kl_divergence(q, p))


def test_vae_loss_known_values():
    x = torch.zeros(2, 3)
    recon = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])  # squared error sum = 5
    mu, lv = torch.ones(2, 4), torch.zeros(2, 4)  # KL = 8 · 0.5 = 4
    assert L.vae_loss(x, recon, mu, lv).item() == pytest.approx(9.0)
    assert L.vae_loss(x, recon, mu, lv, kl_weight=0.5).item() == pytest.approx(7.0)
    assert L.vae_loss(x, recon, mu, lv, reduction="batchmean").item() == pytest.approx(4.5)
    with pytest.raises(ValueError, match="reduction"):
        L.vae_loss(x, recon, mu, lv, reduction="mean")
    with pytest.raises(ValueError, match="x_recon"):
        L.vae_loss(x, recon[:1], mu, lv)


def test_vector_quantization_loss_values_and_gradients():
    z_e = torch.zeros(2, 3, requires_grad=True)
    z_q = torch.ones(2, 3, requires_grad=True)
    loss = L.vector_quantization_loss(z_e, z_q, beta=0.25)
    assert loss.item() == pytest.approx(1.25)  # codebook 1 + 0.25 · commitment 1
    loss.backward()
    # codebook term moves z_q only: d/dz_q mean((z_q − z_e)²) = 2(z_q − z_e)/6; commitment moves z_e only
    torch.testing.assert_close(z_q.grad, torch.full((2, 3), 2 / 6))
    torch.testing.assert_close(z_e.grad, torch.full((2, 3), -0.25 * 2 / 6))
    assert L.vq_vae_loss(torch.zeros(2, 2), torch.ones(2, 2), torch.tensor(0.5)).item() == pytest.approx(1.5)


# --------------------------------------------------------------------------------------------- GANs
def test_bce_gan_losses_known_values():
    zeros = torch.zeros(4, 1)  # D = σ(0) = ½ everywhere
    assert L.gan_discriminator_loss(zeros, zeros).item() == pytest.approx(2 * math.log(2))
    assert L.gan_generator_loss(zeros).item() == pytest.approx(math.log(2))
    logit = torch.tensor([[math.log(3.0)]])  # σ = 3/4
    assert L.gan_generator_loss(logit).item() == pytest.approx(-math.log(0.75))
    assert L.gan_discriminator_loss(logit, logit).item() == pytest.approx(-math.log(0.75) - math.log(0.25))


def test_bce_gan_losses_match_the_chapter_and_stay_finite():
    real, fake = torch.randn(8, 1), torch.randn(8, 1)
    ones, zeros = torch.ones(8, 1), torch.zeros(8, 1)
    d_ref = F.binary_cross_entropy(torch.sigmoid(real), ones) + F.binary_cross_entropy(torch.sigmoid(fake), zeros)
    torch.testing.assert_close(L.gan_discriminator_loss(real, fake), d_ref)
    torch.testing.assert_close(L.gan_generator_loss(fake), F.binary_cross_entropy(torch.sigmoid(fake), ones))
    big = torch.tensor([[200.0], [-200.0]])
    assert L.gan_generator_loss(big).item() == pytest.approx(100.0)  # (0 + 200) / 2, no inf
    assert torch.isfinite(L.gan_discriminator_loss(big, big))


def test_wgan_losses_known_values():
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 0.0])
    assert L.wgan_discriminator_loss(real, fake).item() == pytest.approx(-0.5 - 2.0)
    assert L.wgan_generator_loss(fake).item() == pytest.approx(0.5)


def test_gradient_penalty_of_a_linear_critic():
    # D(x) = <a, x>: ∇D = a everywhere, so the penalty is (‖a‖ − 1)² whatever the interpolation
    a = torch.tensor([1.2, 1.6]).reshape(1, 2, 1, 1)  # ‖a‖ = 2
    critic = lambda x: (x * a).sum(dim=(1, 2, 3))
    real, fake = torch.randn(3, 2, 1, 1), torch.randn(3, 2, 1, 1)
    assert L.gradient_penalty(critic, real, fake).item() == pytest.approx(1.0)
    unit = lambda x: (x * a / 2).sum(dim=(1, 2, 3))
    assert L.gradient_penalty(unit, real, fake, eps=torch.tensor([0.0, 0.5, 1.0])).item() == pytest.approx(0.0, abs=1e-12)
    # with the WGAN terms: E[D(fake)] − E[D(real)] + 10 · 1
    expected = critic(fake).mean() - critic(real).mean() + 10.0
    torch.testing.assert_close(L.wgan_gp_discriminator_loss(critic, real, fake), expected)


def test_gradient_penalty_trains_the_critic():
    torch.manual_seed(0)
    critic = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        critic.weight.copy_(torch.tensor([[3.0, 0.0, 4.0]]))  # ‖w‖ = 5
    gp = L.gradient_penalty(critic, torch.randn(4, 3), torch.randn(4, 3))
    assert gp.item() == pytest.approx(16.0)
    gp.backward()  # d/dw (‖w‖ − 1)² = 2(‖w‖ − 1)·w/‖w‖
    torch.testing.assert_close(critic.weight.grad, 2 * 4 * torch.tensor([[3.0, 0.0, 4.0]]) / 5)
    with pytest.raises(ValueError, match="eps"):
        L.gradient_penalty(critic, torch.randn(4, 3), torch.randn(4, 3), eps=torch.rand(3))
