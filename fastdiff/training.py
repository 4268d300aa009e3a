"""``fastdiff train <name>``: the recipes that produced the shipped digit models, reproducible on a 2-core CPU.

Every recipe trains on the train split of :func:`fastdiff.data.load_digits` (16×16), logs the loss periodically
under a tqdm bar, keeps an exponential moving average (EMA) of the weights where it helps, and writes a pipeline
folder (``model_index.json`` + components) with a ``MODEL_CARD.md``.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastdiff.data import IMAGE_SIZE, load_digits
from fastdiff.files import read_json_object, write_json_atomic, write_text_atomic

logger = logging.getLogger("fastdiff")

NUM_CLASSES = 10


@dataclass
class Recipe:
    description: str
    steps: int  # optimiser steps of the main stage
    run: Callable[..., dict]  # run(out, steps, seed, progress) → metrics for the model card
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- shared pieces
class EMA:
    """θ_ema ← d·θ_ema + (1 − d)·θ after every step; warm-started with d_k = min(decay, (1 + k)/(10 + k)), or with
    ``warmup=False`` the fixed d = decay from the first step (a consistency model's target network θ⁻)."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.num_updates, self.warmup = decay, 0, warmup

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates)) if self.warmup else self.decay
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


def _batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless random minibatch indices (reshuffled every epoch)."""
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i:i + batch_size]


def _loop(name: str, steps: int, step_fn: Callable[[int], dict], progress: bool, log_every: int = 100) -> float:
    """Run ``step_fn(k)`` for k < steps under a progress bar; log mean losses every ``log_every`` steps."""
    start = time.perf_counter()
    running: dict[str, float] = {}
    bar = tqdm(range(steps), desc=name, disable=not progress, leave=False)
    for k in bar:
        losses = step_fn(k)
        for key, v in losses.items():
            running[key] = running.get(key, 0.0) + float(v)
        if (k + 1) % log_every == 0 or k + 1 == steps:
            n = (k % log_every) + 1
            line = " ".join(f"{key}={v / n:.4f}" for key, v in running.items())
            msg = f"{name} step {k + 1}/{steps} {line} ({time.perf_counter() - start:.0f}s)"
            bar.write(msg) if progress else logger.info(msg)
            running = {}
    return time.perf_counter() - start


def _adam(params, lr: float, betas=(0.9, 0.999)):
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=0.0)


def _update(opt, loss: torch.Tensor, sched=None, clip_params=None) -> None:
    """One optimiser step on ``loss``: clear the gradients, backpropagate, (clip them to norm 1), step, (schedule)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip_params is not None:
        torch.nn.utils.clip_grad_norm_(clip_params, 1.0)
    opt.step()
    if sched is not None:
        sched.step()


def _warmup_cosine(opt, steps: int, warmup: int = 100):
    def factor(k):
        if k < warmup:
            return (k + 1) / warmup
        return 0.5 * (1 + torch.cos(torch.tensor((k - warmup) / max(1, steps - warmup) * torch.pi)).item()) * 0.9 + 0.1

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _train_diffusion(unet, latents: torch.Tensor, labels: torch.Tensor, steps: int, seed: int, progress: bool,
                     name: str, lr: float = 2e-3, batch_size: int = 128, p_uncond: float = 0.1):
    """Class-conditional ε-prediction training (the DDPM loss) with label dropout to the null class for CFG."""
    from fastdiff.models import losses
    from fastdiff.schedulers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    alphas_cumprod = scheduler.alphas_cumprod
    gen = torch.Generator().manual_seed(seed)
    opt = _adam(unet.parameters(), lr)
    sched = _warmup_cosine(opt, steps)
    ema = EMA(unet, 0.999)
    batches = _batches(len(latents), batch_size, gen)
    unet.train()

    def step(k):
        idx = next(batches)
        x0, y = latents[idx], labels[idx].clone()
        drop = torch.rand(len(y), generator=gen) < p_uncond
        y[drop] = NUM_CLASSES  # the null class
        t = torch.randint(0, 1000, (len(y),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        loss = losses.ddpm_loss(unet, x0, t, noise, alphas_cumprod, class_labels=y)
        _update(opt, loss, sched, clip_params=unet.parameters())
        ema.update(unet)
        return {"loss": loss.item()}

    seconds = _loop(name, steps, step, progress)
    return ema.model, scheduler, seconds


def _digit_unet(in_channels: int, size: int):
    from fastdiff.models import UNet

    return UNet(in_channels=in_channels, out_channels=in_channels, base_channels=32, channel_mult=(1, 2, 2),
                layers_per_block=1, attention_levels=(1,), mid_attention=True, attention_head_dim=16,
                norm_num_groups=8, num_classes=NUM_CLASSES)


# --------------------------------------------------------------------------------------------- recipes
def run_ddpm(out: Path, steps: int, seed: int, progress: bool) -> dict:
    from fastdiff.pipelines import DiffusionPipeline

    torch.manual_seed(seed)
    x, y = load_digits("train")
    unet = _digit_unet(1, IMAGE_SIZE)
    unet, scheduler, seconds = _train_diffusion(unet, x, y, steps, seed, progress, "digits-ddpm")
    pipe = DiffusionPipeline(unet, _ddim_like(scheduler), sample_size=IMAGE_SIZE)
    _settings(pipe, "class-conditional pixel-space DDPM (16×16 digits), CFG", steps=25, guidance=2.0)
    pipe.save_pretrained(out)
    return {"train_seconds": round(seconds), "train_steps": steps, "parameters": _count(unet)}


def _ddim_like(scheduler):
    """The shipped sampler: DDIM with the training noise schedule, without x0 clipping (with guidance, clipping x0
    but not ε makes the two disagree: measured on digits-ddpm at 25 steps, guidance 2, 94.5% correct digits with
    clipping vs 100% without)."""
    from fastdiff.schedulers import DDIMScheduler

    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
    return DDIMScheduler(**{k: v for k, v in dict(scheduler.config).items() if k in keep}, clip_sample=False)


def _encode_all(encode, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([encode(x[i:i + batch]) for i in range(0, len(x), batch)])


def run_ldm(out: Path, steps: int, seed: int, progress: bool) -> dict:
    from fastdiff.models import AutoencoderKL
    from fastdiff.pipelines import LatentDiffusionPipeline

    torch.manual_seed(seed)
    x, y = load_digits("train")
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=2, block_out_channels=(32, 64),
                        layers_per_block=1, norm_num_groups=8, mid_attention=False, scaling_factor=1.0)
    gen = torch.Generator().manual_seed(seed)
    opt = _adam(vae.parameters(), 2e-3)
    vae_steps = max(1, min(400, steps))  # the autoencoder converges long before the latent UNet
    sched = _warmup_cosine(opt, vae_steps)
    batches = _batches(len(x), 64, gen)
    vae.train()

    def vae_step(k):
        xb = x[next(batches)]
        posterior = vae.encode(xb)
        recon = vae.decode(posterior.sample(gen))
        rec = F.mse_loss(recon, xb)
        kl = posterior.kl().mean() / xb[0].numel()
        loss = rec + 1e-3 * kl
        _update(opt, loss, sched)
        return {"recon": rec.item(), "kl": kl.item()}

    vae_seconds = _loop("digits-ldm/vae", vae_steps, vae_step, progress)
    vae.eval()
    latents = _encode_all(lambda b: vae.encode(b).mode(), x)
    scale = float(1.0 / latents.std())
    vae.config.scaling_factor = scale
    unet = _digit_unet(latents.shape[1], latents.shape[-1])
    unet, scheduler, unet_seconds = _train_diffusion(unet, latents * scale, y, steps, seed, progress,
                                                     "digits-ldm/unet")
    pipe = LatentDiffusionPipeline(unet, vae, _ddim_like(scheduler), sample_size=latents.shape[-1])
    _settings(pipe, "class-conditional latent diffusion: AutoencoderKL (2×8×8 latents) + UNet, CFG", steps=25,
              guidance=3.0)
    pipe.save_pretrained(out)
    return {"train_seconds": round(vae_seconds + unet_seconds), "vae_steps": vae_steps, "unet_steps": steps,
            "latent_scaling_factor": round(scale, 5), "parameters": _count(unet) + _count(vae)}


def run_vqvae(out: Path, steps: int, seed: int, progress: bool) -> dict:
    from fastdiff.models import VQVAE
    from fastdiff.pipelines import VQPipeline

    torch.manual_seed(seed)
    x, y = load_digits("train")
    vq = VQVAE(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
               norm_num_groups=8, mid_attention=False, num_embeddings=64, embedding_dim=4, ema=True)
    gen = torch.Generator().manual_seed(seed)
    opt = _adam(vq.parameters(), 2e-3)
    vq_steps = max(1, min(800, steps))
    sched = _warmup_cosine(opt, vq_steps)
    batches = _batches(len(x), 64, gen)
    vq.train()

    def vq_step(k):
        xb = x[next(batches)]
        recon, _, vq_loss = vq(xb)
        rec = F.mse_loss(recon, xb)
        loss = rec + vq_loss
        _update(opt, loss, sched)
        return {"recon": rec.item(), "vq": vq_loss.item()}

    vq_seconds = _loop("digits-vqvae/vqvae", vq_steps, vq_step, progress)
    vq.eval()
    latents = _encode_all(vq.encode_latents, x)  # z_e before quantisation, (N, 4, 8, 8)
    scale = float(1.0 / latents.std())
    vq.config.scaling_factor = scale
    with torch.no_grad():
        codes_used = int(torch.unique(_encode_all(vq.encode, x)).numel())
    unet = _digit_unet(latents.shape[1], latents.shape[-1])
    unet, scheduler, unet_seconds = _train_diffusion(unet, latents * scale, y, steps, seed, progress,
                                                     "digits-vqvae/prior")
    pipe = VQPipeline(vq, unet, _ddim_like(scheduler), sample_size=latents.shape[-1])
    _settings(pipe, "VQ-VAE (64 codes, 8×8 grid); codes sampled by a class-conditional latent DDPM prior on z_e",
              steps=25, guidance=3.0)
    pipe.save_pretrained(out)
    return {"train_seconds": round(vq_seconds + unet_seconds), "vqvae_steps": vq_steps, "prior_steps": steps,
            "codes_used": codes_used, "parameters": _count(unet) + _count(vq)}


# --------------------------------------------------------------------------------------------- consistency distillation
LCM_SKIP = 20  # k: the teacher's solver jumps k of the 1000 training timesteps (LCM's skipping-step)
LCM_W_RANGE = (1.0, 4.0)  # w ~ U[w_min, w_max], the guidance scales distilled in (fastdiff's s: uncond + s·(c − u))
LCM_GUIDANCE = 2.0  # the saved default w: digits-ddpm's own default guidance (100% correct digits at 25 DDIM steps)
LCM_EMA_DECAY = 0.95  # μ of the target network θ⁻ (LCM's)
LCM_BATCH = 64
LCM_LR = 1e-5  # small: x̂0 = (x − √(1 − ᾱ)·ε)/√ᾱ amplifies ε by up to 1/√ᾱ_999 ≈ 160 (1e-4 diverges at once)
LCM_GUIDANCE_DIM = 64  # width of the w embedding (UNetConfig.guidance_embedding_dim)


class ConsistencyDistillation:
    """Latent consistency distillation (Luo et al. 2023, Algorithm 1) of a class-conditional ε-prediction UNet,
    classifier-free guidance distilled in.

    * teacher: frozen; one DDIM step with guidance s = w from t_{n+k} to t_n is the ODE solver Ψ.
    * student θ: the teacher's weights in a UNet with a guidance embedding (``guidance_embedding_dim``) whose
      projection ``time_embedding.cond_proj`` starts at zero, so at step 0 the student is the teacher for every w.
    * target θ⁻: an EMA of the student with a fixed μ (``EMA(..., warmup=False)``), never the student itself.
    * the consistency function f(x, t, w, y) = c_skip(t)·x + c_out(t)·x̂0, x̂0 = (x − √(1 − ᾱ_t)·ε)/√ᾱ_t, with c_skip
      and c_out of :func:`fastdiff.schedulers.lcm.boundary_scalings` (σ_data 0.5, t scaled by ``timestep_scaling``),
      the same ones LCMScheduler samples with.
    * the loss: pseudo-Huber (c = 0.001·√d) between f_θ(x_{t_{n+k}}, t_{n+k}, w) and f_θ⁻(x̂_{t_n}, t_n, w).

    The timesteps are those of LCMScheduler(original_inference_steps = T // skip): t_{n+k} = k·i − 1 for
    i ∈ [1, T // k], t_n = t_{n+k} − k clamped at 0 (where c_skip = 1, c_out = 0: the boundary condition).
    """

    def __init__(self, teacher, alphas_cumprod: torch.Tensor, skip: int = LCM_SKIP,
                 w_range: tuple[float, float] = LCM_W_RANGE, ema_decay: float = LCM_EMA_DECAY,
                 guidance_embedding_dim: int = LCM_GUIDANCE_DIM, timestep_scaling: float = 10.0):
        import dataclasses

        from fastdiff.models import UNet

        if teacher.config.num_classes is None:
            raise ValueError("teacher must be a class-conditional UNet (its config has num_classes): guidance is "
                             "distilled from its [null; label] pair")
        if teacher.config.guidance_embedding_dim is not None:
            raise ValueError("teacher already has a guidance embedding; distil from a UNet guided by its scheduler")
        num_train = len(alphas_cumprod)
        if not 1 <= skip <= num_train:
            raise ValueError(f"skip must be in [1, {num_train}], got {skip}")
        if not 0.0 <= w_range[0] <= w_range[1]:
            raise ValueError(f"w_range must be (w_min, w_max) with 0 ≤ w_min ≤ w_max, got {w_range}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.alphas_cumprod = alphas_cumprod.detach().float()  # (T,)
        self.skip, self.w_range, self.timestep_scaling = skip, w_range, timestep_scaling
        self.original_inference_steps = num_train // skip

        self.student = UNet(dataclasses.replace(teacher.config, guidance_embedding_dim=guidance_embedding_dim))
        missing, unexpected = self.student.load_state_dict(teacher.state_dict(), strict=False)
        if missing != ["time_embedding.cond_proj.weight"] or unexpected:  # every teacher weight has its place
            raise RuntimeError(f"student/teacher weights do not line up: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            self.student.time_embedding.cond_proj.weight.zero_()  # the student starts as the teacher
        self.student.train()
        self.target = EMA(self.student, ema_decay, warmup=False)

    # 1. the boundary-condition parameterisation
    def consistency(self, unet, x: torch.Tensor, t: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """f(x, t, w, y) = c_skip(t)·x + c_out(t)·x̂0 for x (B, C, H, W) fp32, t (B,) int64, w (B,) fp32, y (B,)."""
        from fastdiff.schedulers.lcm import boundary_scalings

        scalings = torch.tensor([boundary_scalings(float(ti), self.timestep_scaling) for ti in t.tolist()])  # (B, 2)
        c_skip, c_out = (v.view(-1, 1, 1, 1) for v in scalings.unbind(1))
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = unet(x, t.float(), class_labels=y, guidance=w)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return c_skip * x + c_out * x0

    # 2. the solver Ψ: one teacher DDIM step under classifier-free guidance
    @torch.no_grad()
    def solver_step(self, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, w: torch.Tensor,
                    y: torch.Tensor) -> torch.Tensor:
        """x̂_s from x_t (s < t): ε̃ = ε_u + w·(ε_c − ε_u) from one teacher call on [uncond; cond], then DDIM (η = 0):
        x̂0 = (x_t − √(1 − ᾱ_t)·ε̃)/√ᾱ_t, x̂_s = √ᾱ_s·x̂0 + √(1 − ᾱ_s)·ε̃."""
        null = torch.full_like(y, self.teacher.config.num_classes)
        eps_u, eps_c = self.teacher(torch.cat([x_t, x_t]), torch.cat([t, t]).float(),
                                    class_labels=torch.cat([null, y])).chunk(2)
        eps = eps_u + w.view(-1, 1, 1, 1) * (eps_c - eps_u)
        a_t, a_s = self.alphas_cumprod[t].view(-1, 1, 1, 1), self.alphas_cumprod[s].view(-1, 1, 1, 1)
        x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        return a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps

    # 3. the consistency loss
    def loss(self, x0: torch.Tensor, y: torch.Tensor, generator: Optional[torch.Generator] = None,
             **fixed) -> torch.Tensor:
        """The consistency-distillation loss of a batch x0 (B, C, H, W) in [−1, 1] with labels y (B,). Draws
        i ~ U{1 … T//k}, w ~ U[w_range] and ε ~ N(0, I) from ``generator`` unless given in ``fixed`` (index=,
        w=, noise=: a fixed batch for tests)."""
        from fastdiff.models.losses import pseudo_huber_loss, q_sample

        unknown = sorted(set(fixed) - {"index", "w", "noise"})
        if unknown:
            raise ValueError(f"unknown fixed input(s) {unknown}: the loss takes index=, w= and noise=")
        b = len(x0)
        index = fixed.get("index")
        if index is None:
            index = torch.randint(1, self.original_inference_steps + 1, (b,), generator=generator)
        w = fixed.get("w")
        if w is None:
            w_min, w_max = self.w_range
            w = w_min + (w_max - w_min) * torch.rand(b, generator=generator)
        noise = fixed.get("noise")
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator)
        t = index * self.skip - 1  # t_{n+k}, on LCMScheduler's timesteps
        s = (t - self.skip).clamp(min=0)  # t_n
        x_t = q_sample(x0, t, noise, self.alphas_cumprod)
        x_s = self.solver_step(x_t, t, s, w, y)
        pred = self.consistency(self.student, x_t, t, w, y)
        with torch.no_grad():
            target = self.consistency(self.target.model, x_s, s, w, y)
        return pseudo_huber_loss(pred, target)


def run_lcm(out: Path, steps: int, seed: int, progress: bool) -> dict:
    """Consistency distillation of the shipped digits-ddpm into a 1–4-step sampler (LCMScheduler)."""
    import fastdiff
    from fastdiff.pipelines import DiffusionPipeline
    from fastdiff.schedulers import LCMScheduler

    torch.manual_seed(seed)
    x, y = load_digits("train")
    teacher = fastdiff.load("digits-ddpm")
    distill = ConsistencyDistillation(teacher.unet, teacher.scheduler.alphas_cumprod)
    gen = torch.Generator().manual_seed(seed)
    opt = _adam(distill.student.parameters(), LCM_LR)
    batches = _batches(len(x), LCM_BATCH, gen)

    def step(k):
        idx = next(batches)
        loss = distill.loss(x[idx], y[idx], gen)
        _update(opt, loss, clip_params=distill.student.parameters())
        distill.target.update(distill.student)
        return {"loss": loss.item()}

    seconds = _loop("digits-lcm", steps, step, progress)
    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
    scheduler = LCMScheduler(**{k: v for k, v in dict(teacher.scheduler.config).items() if k in keep},
                             original_inference_steps=distill.original_inference_steps)
    student = distill.student.eval().requires_grad_(False)
    pipe = DiffusionPipeline(student, scheduler, sample_size=IMAGE_SIZE)
    _settings(pipe, "latent-consistency distillation of digits-ddpm (guidance distilled in: one UNet call per step), "
              "LCMScheduler", steps=4, guidance=LCM_GUIDANCE)
    pipe.save_pretrained(out)
    return {"train_seconds": round(seconds), "train_steps": steps, "parameters": _count(student),
            "batch_size": LCM_BATCH, "lr": LCM_LR, "skip": LCM_SKIP, "w_range": list(LCM_W_RANGE),
            "ema_decay": LCM_EMA_DECAY, "loss": "pseudo-Huber, c = 0.001·√d"}


def translate(x: torch.Tensor, max_shift: int, generator: torch.Generator, fill: float = -1.0) -> torch.Tensor:
    """Shift each image of x (B, C, H, W) by its own random (dy, dx) ∈ [−max_shift, max_shift]², filling with ``fill``
    (the background). Differentiable in x: the discriminator augmentation of ``digits-dcgan``."""
    b, c, h, w = x.shape
    m = max_shift
    padded = F.pad(x, (m, m, m, m), value=fill)
    sy = torch.randint(0, 2 * m + 1, (b,), generator=generator)
    sx = torch.randint(0, 2 * m + 1, (b,), generator=generator)
    rows = (sy[:, None] + torch.arange(h)).view(b, 1, h, 1).expand(b, c, h, w + 2 * m)
    out = torch.gather(padded, 2, rows)
    cols = (sx[:, None] + torch.arange(w)).view(b, 1, 1, w).expand(b, c, h, w)
    return torch.gather(out, 3, cols)


def run_dcgan(out: Path, steps: int, seed: int, progress: bool) -> dict:
    """DCGAN with non-saturating BCE losses. 1,438 training images are few for a GAN: the discriminator memorises them
    (without augmentation: D loss → 0.02 and a Fréchet ratio of 8.6 at 12,000 steps). Both real and generated images
    are shifted by up to ±2 px before the discriminator sees them (the same differentiable augmentation for both, so
    the generator is not pushed to make shifted digits): ratio 2.15 at 12,000 steps in the experiment that chose it."""
    from fastdiff.models import DCGANDiscriminator, DCGANGenerator, losses
    from fastdiff.pipelines import GANPipeline

    torch.manual_seed(seed)
    x, _ = load_digits("train")
    g = DCGANGenerator(resolution=IMAGE_SIZE, latent_dim=64, channels=1, width=32)
    d = DCGANDiscriminator(resolution=IMAGE_SIZE, latent_dim=64, channels=1, width=32)
    gen = torch.Generator().manual_seed(seed)
    opt_g = _adam(g.parameters(), 2e-4, betas=(0.5, 0.999))
    opt_d = _adam(d.parameters(), 2e-4, betas=(0.5, 0.999))
    ema = EMA(g, 0.999)
    batches = _batches(len(x), 64, gen)
    g.train(), d.train()

    def step(k):
        real = x[next(batches)]
        z = torch.randn(len(real), 64, generator=gen)
        fake = g(z)
        loss_d = losses.gan_discriminator_loss(d(translate(real, 2, gen)), d(translate(fake.detach(), 2, gen)))
        _update(opt_d, loss_d)
        loss_g = losses.gan_generator_loss(d(translate(fake, 2, gen)))
        _update(opt_g, loss_g)
        ema.update(g)
        return {"loss_d": loss_d.item(), "loss_g": loss_g.item()}

    seconds = _loop("digits-dcgan", steps, step, progress)
    pipe = GANPipeline(ema.model)
    _settings(pipe, "DCGAN (16×16 digits, non-saturating BCE losses, ±2 px translation augmentation for D)")
    pipe.save_pretrained(out)
    return {"train_seconds": round(seconds), "train_steps": steps, "parameters": _count(g)}


def run_classifier(out: Path, steps: int, seed: int, progress: bool) -> dict:
    from fastdiff.models.classifier import DigitClassifier

    torch.manual_seed(seed)
    x, y = load_digits("train")
    xt, yt = load_digits("test")
    model = DigitClassifier()
    gen = torch.Generator().manual_seed(seed)
    opt = _adam(model.parameters(), 2e-3)
    batches = _batches(len(x), 64, gen)
    model.train()

    def step(k):
        idx = next(batches)
        xb = x[idx]
        # small random shifts (±1 px) so the classifier does not rely on exact placement
        dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
        xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
        loss = F.cross_entropy(model(xb), y[idx])
        _update(opt, loss)
        return {"loss": loss.item()}

    seconds = _loop("digits-classifier", steps, step, progress)
    model.eval()
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    return {"train_seconds": round(seconds), "train_steps": steps, "held_out_accuracy": round(acc, 4)}


RECIPES: dict[str, Recipe] = {
    "digits-ddpm": Recipe("class-conditional pixel-space DDPM", 3000, run_ddpm),
    "digits-ldm": Recipe("AutoencoderKL + class-conditional latent UNet", 3000, run_ldm),
    "digits-vqvae": Recipe("VQ-VAE + latent DDPM prior on z_e", 3000, run_vqvae),
    "digits-dcgan": Recipe("DCGAN with ±2 px translation augmentation for the discriminator", 12000, run_dcgan),
    "digits-classifier": Recipe("digit classifier for fastdiff eval", 1500, run_classifier),
    # 1500 steps: 1.08 s per step measured (batch 64, one thread, the machine busy with other jobs) → 27 min
    "digits-lcm": Recipe("latent-consistency distillation of digits-ddpm for 1–4-step sampling", 1500, run_lcm),
}


def _settings(pipe, description: str, steps: Optional[int] = None, guidance: Optional[float] = None) -> None:
    pipe.settings["description"] = description
    if steps is not None:
        pipe.settings["default_steps"] = steps
    if guidance is not None:
        pipe.settings["default_guidance_scale"] = guidance
    pipe.settings["grid_scale"] = 4


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def train(name: str, out: Path, steps: Optional[int] = None, seed: int = 0, progress: bool = True) -> dict:
    """Train recipe ``name`` into folder ``out``; returns the metrics written to ``out/train_metrics.json``."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}")
    recipe = RECIPES[name]
    steps = steps or recipe.steps
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = recipe.run(out, steps, seed, progress)
    metrics.update({"recipe": name, "seed": seed, "torch": torch.__version__,
                    "threads": torch.get_num_threads()})
    write_json_atomic(out / "train_metrics.json", metrics)
    write_model_card(out)
    logger.info("%s: trained in %s s → %s", name, metrics["train_seconds"], out)
    return metrics


DATA_CARD = (
    "scikit-learn's bundled handwritten digits (`sklearn.datasets.load_digits`: 1,797 grayscale 8×8 images, pixel "
    "values 0–16; nothing downloaded). Split once with a fixed seed (0): 1,438 train / 359 held out; only the "
    "train split is used for training."
)
PREPROCESSING_CARD = "pixels / 16 → bilinear upscaling 8×8 → 16×16 → scaled to [−1, 1]. Images are 16×16, 1 channel."


_SAMPLER_WORDS = {"DDIMScheduler": "DDIM", "LCMScheduler": "LCM", "DDPMScheduler": "DDPM"}  # the card's sampler name


def write_model_card(folder: Path, evaluation: Optional[dict] = None) -> Path:
    """(Re)write ``folder/MODEL_CARD.md`` from ``train_metrics.json`` (and an evaluation report, stored in
    ``eval_metrics.json`` so later rewrites keep it)."""
    folder = Path(folder)
    metrics = read_json_object(folder / "train_metrics.json")
    eval_file = folder / "eval_metrics.json"
    if evaluation is not None:
        write_json_atomic(eval_file, evaluation)
    elif eval_file.is_file():
        evaluation = read_json_object(eval_file)
    name = metrics["recipe"]
    recipe = RECIPES[name]
    lines = [f"# {name}", "", recipe.description + ".", "",
             f"- **Data**: {DATA_CARD}",
             f"- **Preprocessing**: {PREPROCESSING_CARD}",
             f"- **Training**: `fastdiff train {name}` (seed {metrics['seed']}); "
             + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in metrics.items()
                         if k not in ("recipe", "seed", "torch", "threads", "train_seconds")),
             f"- **CPU time**: {metrics['train_seconds']} s with {metrics['threads']} thread(s), torch "
             f"{metrics['torch']} (a shared 2-core machine: an idle one is faster)"]
    if evaluation:
        lines.append(f"- **Quality** (`fastdiff eval {name}`, {evaluation['num']} samples"
                     + (f", {evaluation['steps']} {_SAMPLER_WORDS.get(evaluation.get('sampler'), 'DDIM')} steps"
                        if evaluation.get("steps") else "")
                     + (f", guidance {evaluation['guidance']}" if evaluation.get("guidance") is not None else "")
                     + "):")
        if "accuracy" in evaluation:
            lines.append(f"  - classified as the requested digit by the shipped classifier: "
                         f"{100 * evaluation['accuracy']:.1f}%")
        lines.append(f"  - Fréchet distance in the classifier's features vs the held-out digits: "
                     f"{evaluation['fd']:.2f} (real train vs held-out: {evaluation['fd_real']:.2f}; ratio "
                     f"{evaluation['fd_ratio']:.2f})")
        lines.append(f"  - class histogram of the samples (0–9): {evaluation['histogram']}")
    path = folder / "MODEL_CARD.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
