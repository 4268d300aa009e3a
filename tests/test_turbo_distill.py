"""Adversarial diffusion distillation (issue 18, the ``digits-turbo`` recipe): the feature discriminator, the
student's parameterisations and boundary condition, the teacher's DDIM pairs against a plain loop, the losses'
gradients (student only, frozen teacher and feature network) and the recipe end to end on a tiny budget."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import fastdiff
from fastdiff import training
from fastdiff.models import UNet
from fastdiff.schedulers import DDPMScheduler, LCMScheduler

NUM_CLASSES = 10


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_unet(seed: int, **overrides) -> UNet:
    torch.manual_seed(seed)
    kwargs = dict(in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                  attention_levels=(1,), attention_head_dim=16, norm_num_groups=8, num_classes=NUM_CLASSES)
    unet = UNet(**{**kwargs, **overrides}).eval()
    with torch.no_grad():  # fresh random weights everywhere (zero-initialised output layers would hide terms)
        for p in unet.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return unet


def _tiny_encoder():
    from fastdiff.models import AutoencoderKL

    torch.manual_seed(3)
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=2, block_out_channels=(8, 16),
                        layers_per_block=1, norm_num_groups=4)
    return vae.encoder


def _setup(prediction_type="sample", **kwargs):
    teacher = _tiny_unet(0)
    student = _tiny_unet(1, guidance_embedding_dim=16)
    d = training.FeatureDiscriminator(_tiny_encoder(), width=8)
    alphas = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").alphas_cumprod
    return training.AdversarialDistillation(teacher, student, d, alphas, prediction_type=prediction_type, **kwargs)


def _batch(b=4, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, 16, 16, generator=g) * 2 - 1, torch.arange(b) % NUM_CLASSES


# --------------------------------------------------------------------------------------------- the discriminator
def test_feature_discriminator_scores_and_keeps_its_features_frozen():
    add = _setup()
    d = add.discriminator
    x, y = _batch()
    scores = d(x, y)
    assert scores.shape == (4,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert not any(p.requires_grad for p in d.encoder.parameters())
    assert all(p.requires_grad for n, p in d.named_parameters() if not n.startswith("encoder."))
    d.train()
    assert not d.encoder.training  # frozen features stay in eval mode
    # the class enters through the projection: another label, another score
    assert not torch.allclose(d(x, (y + 1) % NUM_CLASSES), scores)
    # four feature levels of the AutoencoderKL encoder: conv_in, two down blocks, the mid block
    assert len(d.features(x)) == 4 and len(d.heads) == 4


# --------------------------------------------------------------------------------------------- the student
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_denoise_is_the_lcm_output_and_the_identity_at_t_zero(prediction_type):
    """x̂_θ = c_skip·x + c_out·x̂0 with x̂0 from the student's output, written out here per parameterisation;
    at s = 0 (c_skip = 1, c_out = 0) it is x itself: the boundary condition."""
    from fastdiff.schedulers.lcm import boundary_scalings

    add = _setup(prediction_type)
    x, y = _batch()
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    s = torch.tensor([999, 759, 259, 0])
    with torch.no_grad():
        out = add.student(x, s.float(), class_labels=y, guidance=w)
        got = add.denoise(x, s, w, y)
    a = add.alphas_cumprod[s].view(-1, 1, 1, 1).double()
    xd, od = x.double(), out.double()
    x0 = {"epsilon": (xd - (1 - a).sqrt() * od) / a.sqrt(), "sample": od,
          "v_prediction": a.sqrt() * xd - (1 - a).sqrt() * od}[prediction_type]
    c = torch.tensor([boundary_scalings(float(t), 10.0) for t in s], dtype=torch.float64)
    want = c[:, 0].view(-1, 1, 1, 1) * xd + c[:, 1].view(-1, 1, 1, 1) * x0
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got[3], x[3], rtol=0, atol=1e-6)  # t = 0: the identity


def test_guidance_embedding_changes_the_student_output():
    add = _setup()
    x, y = _batch()
    s = torch.full((4,), 999)
    with torch.no_grad():
        add.student.time_embedding.cond_proj.weight.normal_(0, 0.5)
        a = add.denoise(x, s, torch.full((4,), 1.0), y)
        b = add.denoise(x, s, torch.full((4,), 4.0), y)
    assert (a - b).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------- the teacher
def test_teacher_sample_matches_a_plain_guided_ddim_loop():
    """The pairs' teacher: guided DDIM (η = 0, x0 clipped, ε recomputed from it) on trailing timesteps, written out
    step by step in float64 here."""
    add = _setup()
    g = torch.Generator().manual_seed(7)
    z = torch.randn(3, 1, 16, 16, generator=g)
    y = torch.tensor([1, 4, 9])
    w = torch.tensor([1.0, 2.5, 4.0])
    got = add.teacher_sample(z, y, w, steps=4)
    ts = [999, 749, 499, 249]  # trailing: round(1000 − 1 − i·250)
    abar = add.alphas_cumprod.double()
    x = z.double()
    null = torch.full_like(y, NUM_CLASSES)
    for i, t in enumerate(ts):
        with torch.no_grad():
            tt = torch.full((3,), float(t))
            e_u = add.teacher(x.float(), tt, class_labels=null).double()
            e_c = add.teacher(x.float(), tt, class_labels=y).double()
        eps = e_u + w.double().view(-1, 1, 1, 1) * (e_c - e_u)
        x0 = ((x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()).clamp(-1, 1)
        if i == len(ts) - 1:
            x = x0
            break
        eps = (x - abar[t].sqrt() * x0) / (1 - abar[t]).sqrt()
        x = abar[ts[i + 1]].sqrt() * x0 + (1 - abar[ts[i + 1]]).sqrt() * eps
    torch.testing.assert_close(got.double(), x, rtol=1e-4, atol=2e-4)
    assert got.abs().max() <= 1.0


# --------------------------------------------------------------------------------------------- the losses
def test_losses_train_the_student_and_the_heads_only():
    add = _setup()
    x, y = _batch(8)
    g = torch.Generator().manual_seed(0)
    pairs = training.turbo_pairs(add, 8, g, steps=2)
    frozen = {k: v.clone() for k, v in [*add.teacher.state_dict().items(),
                                       *(("enc." + k, v) for k, v in add.discriminator.encoder.state_dict().items())]}
    calls = []
    opt_d = torch.optim.SGD([p for p in add.discriminator.parameters() if p.requires_grad], lr=0.1)
    heads_before = copy.deepcopy(add.discriminator.heads.state_dict())

    def update_d(loss_d):
        calls.append(loss_d.item())
        training._update(opt_d, loss_d)

    loss_d, loss_g, parts = add.losses(x, y, g, update_discriminator=update_d, pairs=pairs)
    assert len(calls) == 1 and set(parts) == {"loss_d", "adv", "distill", "regress"}
    assert all(torch.isfinite(torch.tensor(v)) for v in parts.values())
    heads_after = add.discriminator.heads.state_dict().values()
    assert any(not torch.equal(a, b) for a, b in zip(heads_before.values(), heads_after))
    add.student.zero_grad()
    loss_g.backward()
    assert all(p.grad is not None for p in add.student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in add.teacher.parameters())
    assert all(p.grad is None for p in add.discriminator.encoder.parameters())
    state = {**add.teacher.state_dict(), **{"enc." + k: v for k, v in add.discriminator.encoder.state_dict().items()}}
    assert all(torch.equal(frozen[k], state[k]) for k in frozen)
    # without pairs: the ADD loss alone (adversarial + distillation)
    _, _, parts = add.losses(x, y, g)
    assert set(parts) == {"loss_d", "adv", "distill"}


def test_regression_loss_is_zero_for_a_student_that_returns_the_pair():
    add = _setup()
    g = torch.Generator().manual_seed(1)
    pairs = training.turbo_pairs(add, 6, g, steps=2)
    z, y, w, x = pairs
    # a "student" that knows the answer: x̂0 = the pair's sample for its noise (sample prediction, any timestep)
    table = {tuple(zi.flatten()[:4].tolist()): xi for zi, xi in zip(z, x)}

    class Oracle(torch.nn.Module):
        config = add.student.config

        def forward(self, x_s, t, class_labels=None, guidance=None):
            return torch.stack([table.get(tuple(xi.flatten()[:4].tolist()), torch.zeros_like(xi)) for xi in x_s])

    add.student = Oracle()
    add.p_first = 1.0  # every sample starts from its own noise at t = 999: c_skip ≈ 0, c_out ≈ 1
    loss = training.turbo_regression_loss(add, pairs, g)
    assert loss.item() < 1e-8
    add.student = _tiny_unet(1, guidance_embedding_dim=16)
    assert training.turbo_regression_loss(add, pairs, g).item() > 1e-3


@pytest.mark.parametrize("change, match", [
    (dict(timesteps=()), "timesteps"), (dict(timesteps=(1000,)), "timesteps"), (dict(p_first=1.5), "p_first"),
    (dict(prediction_type="x0"), "prediction_type")])
def test_bad_arguments_are_rejected(change, match):
    with pytest.raises(ValueError, match=match):
        _setup(**change)


def test_teacher_and_student_roles_are_checked():
    alphas = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    d = training.FeatureDiscriminator(_tiny_encoder(), width=8)
    guided = _tiny_unet(1, guidance_embedding_dim=16)
    with pytest.raises(ValueError, match="teacher"):
        training.AdversarialDistillation(guided, guided, d, alphas)
    with pytest.raises(ValueError, match="student"):
        training.AdversarialDistillation(_tiny_unet(0), _tiny_unet(2), d, alphas)
    with pytest.raises(ValueError, match="teacher"):
        training.AdversarialDistillation(_tiny_unet(0, num_classes=None), guided, d, alphas)


# --------------------------------------------------------------------------------------------- the recipe
def test_recipe_end_to_end_samples_in_one_step(tmp_path, monkeypatch):
    assert "digits-turbo" in training.RECIPES
    monkeypatch.setattr(training, "ADD_BATCH", 8)
    metrics = training.train("digits-turbo", tmp_path / "turbo", steps=3, progress=False)
    assert metrics["train_steps"] == 3 and metrics["teacher_pairs"] == 24 and metrics["warm_start_steps"] == 1
    pipe = fastdiff.load(tmp_path / "turbo")
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.scheduler.config.prediction_type == "sample"
    assert pipe.settings["default_steps"] == 1
    assert dataclasses.asdict(pipe.unet.config)["guidance_embedding_dim"] == training.LCM_GUIDANCE_DIM
    for steps in (1, 2):
        images = pipe(batch_size=3, num_inference_steps=steps, class_labels=[0, 5, 9], output_type="pt",
                      progress=False, generator=0)
        assert images.shape == (3, 1, 16, 16) and torch.isfinite(images).all()
    assert "digits-turbo" in (tmp_path / "turbo" / "MODEL_CARD.md").read_text()


@pytest.mark.skipif("digits-turbo" not in fastdiff.list_models(), reason="digits-turbo is not shipped in this build")
def test_shipped_digits_turbo_makes_the_requested_digits_in_one_step():
    from fastdiff.evaluation import evaluate

    pipe = fastdiff.load("digits-turbo")
    assert pipe.settings["default_steps"] == 1
    report = evaluate(pipe, num=40, progress=False, model="digits-turbo")
    assert report["steps"] == 1 and report["sampler"] == "LCMScheduler"
    assert report["accuracy"] >= 0.95, report


def test_pair_batches_keep_the_rows_of_a_pair_together():
    """Each minibatch takes the same rows of z, y, w and x (a pair split across rows would teach noise → another
    digit)."""
    n = 40
    pairs = (torch.arange(n).float().view(n, 1, 1, 1).expand(n, 1, 2, 2), torch.arange(n), torch.arange(n).float(),
             -torch.arange(n).float().view(n, 1, 1, 1))
    batches = training.pair_batches(pairs, 8, torch.Generator().manual_seed(0))
    seen = []
    for _ in range(5):  # one epoch
        z, y, w, x = next(batches)
        assert len(y) == 8
        assert torch.equal(z[:, 0, 0, 0], y.float()) and torch.equal(w, y.float()) and torch.equal(x.flatten(), -w)
        seen += y.tolist()
    assert sorted(seen) == list(range(n))
