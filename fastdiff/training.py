"""``fastdiff train <name>``: the recipes that produced the shipped digit models, reproducible on a 2-core CPU.

Every recipe trains on the train split of :func:`fastdiff.data.load_digits` (16×16), logs the loss periodically
under a tqdm bar, keeps an exponential moving average (EMA) of the weights where it helps, and writes a pipeline
folder (``model_index.json`` + components) with a ``MODEL_CARD.md``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastdiff.data import IMAGE_SIZE, load_digits
from fastdiff.files import read_json_object, write_json_atomic, write_text_atomic
from fastdiff.integrity import write_checksums
from fastdiff.validation import check_bool, check_choice, check_fraction, check_int, check_positive_int, check_real

logger = logging.getLogger("fastdiff")

NUM_CLASSES = 10


@dataclass
class Recipe:
    description: str
    steps: int  # optimiser steps of the main stage
    run: Callable[..., dict]  # run(out, steps, seed, progress, **options) → metrics for the model card
    extra: dict = field(default_factory=dict)
    options: tuple = ()  # keyword options run() takes (the GAN recipes: "loss")


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
                     name: str, lr: float = 2e-3, batch_size: int = 128, p_uncond: float = 0.1,
                     context_fn: Optional[Callable] = None):
    """Class-conditional ε-prediction training (the DDPM loss) with label dropout to the null class for CFG.

    With ``context_fn(indices, dropped)`` → (B, M, context_dim) the UNet is conditioned on that context instead of
    the labels (``dropped``: the (B,) bool mask of the examples whose condition is dropped for CFG)."""
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
        if context_fn is None:
            y[drop] = NUM_CLASSES  # the null class
            condition = {"class_labels": y}
        else:
            condition = {"context": context_fn(idx, drop)}
        t = torch.randint(0, 1000, (len(y),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        loss = losses.ddpm_loss(unet, x0, t, noise, alphas_cumprod, **condition)
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


def consistency_output(x: torch.Tensor, t: torch.Tensor, out: torch.Tensor, alphas_cumprod: torch.Tensor,
                       timestep_scaling: float, prediction_type: str = "epsilon") -> torch.Tensor:
    """LCMScheduler's consistency function in training form: f = c_skip(t)·x + c_out(t)·x̂0 for x (B, C, H, W),
    timesteps t (B,) int64 and the model output ``out`` at (x, t), x̂0 from ``out`` by ``prediction_type``
    (x = √ᾱ·x0 + √(1 − ᾱ)·ε), c_skip / c_out of :func:`fastdiff.schedulers.lcm.boundary_scalings`."""
    from fastdiff.schedulers.lcm import boundary_scalings

    scalings = torch.tensor([boundary_scalings(float(ti), timestep_scaling) for ti in t.tolist()])  # (B, 2)
    c_skip, c_out = (v.view(-1, 1, 1, 1) for v in scalings.unbind(1))
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    if prediction_type == "epsilon":
        x0 = (x - (1 - a).sqrt() * out) / a.sqrt()
    elif prediction_type == "v_prediction":
        x0 = a.sqrt() * x - (1 - a).sqrt() * out
    else:
        x0 = out
    return c_skip * x + c_out * x0


@torch.no_grad()
def guided_eps(teacher, x_t: torch.Tensor, t: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A class-conditional ε-teacher under classifier-free guidance: ε̃ = ε_u + w·(ε_c − ε_u) (w (B,) per sample)
    from one call on [uncond (the null class); cond]."""
    null = torch.full_like(y, teacher.config.num_classes)
    eps_u, eps_c = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]).float(), class_labels=torch.cat([null, y])).chunk(2)
    return eps_u + w.view(-1, 1, 1, 1) * (eps_c - eps_u)


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
        return consistency_output(x, t, unet(x, t.float(), class_labels=y, guidance=w), self.alphas_cumprod,
                                  self.timestep_scaling)

    # 2. the solver Ψ: one teacher DDIM step under classifier-free guidance
    @torch.no_grad()
    def solver_step(self, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, w: torch.Tensor,
                    y: torch.Tensor) -> torch.Tensor:
        """x̂_s from x_t (s < t): ε̃ = ε_u + w·(ε_c − ε_u) from one teacher call on [uncond; cond], then DDIM (η = 0):
        x̂0 = (x_t − √(1 − ᾱ_t)·ε̃)/√ᾱ_t, x̂_s = √ᾱ_s·x̂0 + √(1 − ᾱ_s)·ε̃."""
        eps = guided_eps(self.teacher, x_t, t, w, y)
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


def _save_student(out: Path, student, scheduler, description: str, steps: int):
    """A distilled student (frozen, eval mode) saved as a pipeline folder with its scheduler, default steps and the
    default guidance scale w fed to its guidance embedding; returns the student."""
    from fastdiff.pipelines import DiffusionPipeline

    student = student.eval().requires_grad_(False)
    pipe = DiffusionPipeline(student, scheduler, sample_size=IMAGE_SIZE)
    _settings(pipe, description, steps=steps, guidance=LCM_GUIDANCE)
    pipe.save_pretrained(out)
    return student


def run_lcm(out: Path, steps: int, seed: int, progress: bool) -> dict:
    """Consistency distillation of the shipped digits-ddpm into a 1–4-step sampler (LCMScheduler)."""
    import fastdiff
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
    student = _save_student(out, distill.student, scheduler, "latent-consistency distillation of digits-ddpm "
                            "(guidance distilled in: one UNet call per step), LCMScheduler", steps=4)
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


# --------------------------------------------------------------------------------------------- adversarial distillation
ADD_TIMESTEPS = (999, 759, 499, 259)  # the student's timesteps: LCMScheduler's 1-, 2- and 4-step schedules
ADD_P_FIRST = 0.7  # probability of the first (pure-noise) timestep: the one-step case is the one that counts
ADD_DISTILL_WEIGHT = 2.5  # λ of L = L_adv + λ·L_distill (the ADD paper's value)
ADD_BATCH = 64
ADD_LR = 1e-5  # the student's (as digits-lcm's: x̂0 amplifies ε by up to 1/√ᾱ_999 ≈ 160)
ADD_LR_D = 1e-4  # the discriminator heads'
ADD_EMA_DECAY = 0.99
ADD_SHIFT = 2  # ±px translation of every image the discriminator sees (1,438 real digits are few)


class FeatureDiscriminator(torch.nn.Module):
    """The discriminator of adversarial diffusion distillation: a frozen, pretrained feature network and small
    trainable heads, one per feature level, each conditioned on the class by projection.

    The feature network is the encoder of the shipped ``digits-ldm`` AutoencoderKL (trained on the digits as an
    autoencoder, never as a classifier): its activations after ``conv_in`` (32×16×16), each down block (32×8×8,
    64×8×8) and the mid block (64×8×8). The shipped digit classifier, which scores the samples (``fastdiff eval``),
    is deliberately not used. A head is conv3×3 → SiLU → conv1×1 to a logit map plus the projection ⟨h, e_y⟩ (e_y a
    learned class embedding); the score of an image is the sum over heads of the mean over positions.

    forward(x (B, 1, 16, 16) in [−1, 1], y (B,) int64) → scores (B,) fp32.
    """

    def __init__(self, encoder: torch.nn.Module, num_classes: int = NUM_CLASSES, width: int = 64):
        super().__init__()
        self.encoder = copy.deepcopy(encoder).eval().requires_grad_(False)
        with torch.no_grad():
            channels = [f.shape[1] for f in self.features(torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE))]
        self.heads = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Conv2d(c, width, 3, padding=1), torch.nn.SiLU()) for c in channels)
        self.logits = torch.nn.ModuleList(torch.nn.Conv2d(width, 1, 1) for _ in channels)
        self.embed = torch.nn.ModuleList(torch.nn.Embedding(num_classes, width) for _ in channels)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        enc = self.encoder
        h = enc.conv_in(x)
        feats = [h]
        for block in enc.down_blocks:
            h, _ = block(h)
            feats.append(h)
        feats.append(enc.mid_block(h))
        return feats

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen: always in eval mode
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        score = torch.zeros(x.shape[0], device=x.device)
        for f, head, logit, embed in zip(self.features(x), self.heads, self.logits, self.embed):
            h = head(f)  # (B, width, h, w)
            proj = (h * embed(y)[:, :, None, None]).sum(1, keepdim=True)  # ⟨h, e_y⟩ per position
            score = score + (logit(h) + proj).mean((1, 2, 3))
        return score


class AdversarialDistillation:
    """Adversarial diffusion distillation (Sauer et al. 2023, the SDXL-Turbo recipe) of a class-conditional
    ε-prediction teacher into a student that samples in 1–4 steps.

    * student θ: starts from ``init`` (a UNet with a guidance embedding: digits-lcm's); it denoises
      x_s = q_sample(x0, s, ε) of a real digit x0 at s ∈ ``timesteps`` (the first, pure noise, with probability
      ``p_first``) to x̂_θ = c_skip(s)·x_s + c_out(s)·x̂0 — LCMScheduler's output, so the same scheduler samples it.
    * adversarial loss (hinge): the :class:`FeatureDiscriminator` D scores real digits and x̂_θ, both shifted by
      ±``shift`` px; D minimises mean(relu(1 − D(real))) + mean(relu(1 + D(x̂))), the student −mean(D(x̂)).
    * distillation loss: x̂_θ is noised again to t ~ U{0 … T−1}; the frozen teacher's guided prediction
      x̃0 = (x_t − √(1 − ᾱ_t)·ε̃)/√ᾱ_t, ε̃ = ε_u + w·(ε_c − ε_u), clipped to [−1, 1] and detached, is the target:
      mean(ᾱ_t·(x̂_θ − x̃0)²) (the paper's exponential weighting c(t) = ᾱ_t).
    * the student minimises L_adv + λ·L_distill; w ~ U[w_range] goes into its guidance embedding and the teacher.
    """

    def __init__(self, teacher, student, discriminator: FeatureDiscriminator, alphas_cumprod: torch.Tensor,
                 timesteps: tuple[int, ...] = ADD_TIMESTEPS, p_first: float = ADD_P_FIRST,
                 distill_weight: float = ADD_DISTILL_WEIGHT, w_range: tuple[float, float] = LCM_W_RANGE,
                 shift: int = ADD_SHIFT, timestep_scaling: float = 10.0, prediction_type: str = "epsilon",
                 regression_weight: float = 1.0):
        if prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon', 'sample' or 'v_prediction', got {prediction_type!r}")
        self.prediction_type, self.regression_weight = prediction_type, regression_weight
        if teacher.config.num_classes is None or teacher.config.guidance_embedding_dim is not None:
            raise ValueError("teacher must be a class-conditional UNet guided by its scheduler (num_classes set, no "
                             "guidance embedding)")
        if student.config.guidance_embedding_dim is None:
            raise ValueError("student must take the guidance scale as an embedding (guidance_embedding_dim set): "
                             "start it from digits-lcm's UNet")
        num_train = len(alphas_cumprod)
        if not timesteps or any(not 0 <= t < num_train for t in timesteps):
            raise ValueError(f"timesteps must be non-empty, each in [0, {num_train}), got {timesteps}")
        check_fraction("p_first", p_first)
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student.train().requires_grad_(True)
        self.discriminator = discriminator.train()
        self.alphas_cumprod = alphas_cumprod.detach().float()
        self.timesteps = torch.tensor(timesteps)
        self.p_first, self.distill_weight, self.w_range = p_first, distill_weight, w_range
        self.shift, self.timestep_scaling = shift, timestep_scaling

    def _draw(self, b: int, generator: Optional[torch.Generator]):
        first = torch.rand(b, generator=generator) < self.p_first
        rest = self.timesteps[1:] if len(self.timesteps) > 1 else self.timesteps
        other = rest[torch.randint(0, len(rest), (b,), generator=generator)]
        s = torch.where(first, self.timesteps[0], other)
        w_min, w_max = self.w_range
        w = w_min + (w_max - w_min) * torch.rand(b, generator=generator)
        return s, w

    def generate(self, x0: torch.Tensor, y: torch.Tensor, s: torch.Tensor, w: torch.Tensor,
                 noise: torch.Tensor) -> torch.Tensor:
        """x̂_θ (B, C, H, W): the student's consistency output from x_s = q_sample(x0, s, noise)."""
        from fastdiff.models.losses import q_sample

        return self.denoise(q_sample(x0, s, noise, self.alphas_cumprod), s, w, y)

    def denoise(self, x_s: torch.Tensor, s: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x̂_θ = c_skip(s)·x_s + c_out(s)·x̂0(x_s, s, w, y): one student call, LCMScheduler's output at s."""
        return consistency_output(x_s, s, self.student(x_s, s.float(), class_labels=y, guidance=w),
                                  self.alphas_cumprod, self.timestep_scaling, self.prediction_type)

    @torch.no_grad()
    def teacher_x0(self, x_t: torch.Tensor, t: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The teacher's guided x̃0 from x_t, clipped to [−1, 1]: one call on [uncond; cond]."""
        eps = guided_eps(self.teacher, x_t, t, w, y)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return ((x_t - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)

    @torch.no_grad()
    def teacher_sample(self, z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, steps: int) -> torch.Tensor:
        """The teacher's deterministic sample from noise z (B, C, H, W): ``steps`` DDIM steps (η = 0) on trailing
        timesteps from T − 1, guidance w (B,) per sample; clipped to [−1, 1]."""
        n = len(self.alphas_cumprod)
        ts = [round(n - 1 - i * n / steps) for i in range(steps)]
        x = z
        for i, t in enumerate(ts):
            tt = torch.full((len(z),), t, dtype=torch.long)
            x0 = self.teacher_x0(x, tt, w, y)
            if i + 1 == len(ts):
                return x0
            a_t, a_s = self.alphas_cumprod[t], self.alphas_cumprod[ts[i + 1]]
            eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
            x = a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps
        return x

    def losses(self, x0: torch.Tensor, y: torch.Tensor, generator: Optional[torch.Generator] = None,
               update_discriminator: Optional[Callable[[torch.Tensor], None]] = None, pairs=None):
        """(discriminator loss, student loss, parts) of a batch of real digits x0 (B, C, H, W) in [−1, 1] with labels
        y (B,). The discriminator loss sees x̂_θ detached; ``update_discriminator(loss_d)``, when given, steps D
        before the student's adversarial term is computed, so that term scores x̂_θ with the updated D. Step θ's
        optimiser with the student loss (it also leaves gradients in D's heads: clear them before D's next step)."""
        from fastdiff.models.losses import q_sample

        b = len(x0)
        s, w = self._draw(b, generator)
        noise = torch.randn(x0.shape, generator=generator)
        x_s = q_sample(x0, s, noise, self.alphas_cumprod)
        y_fake = y
        regress = None
        if pairs is not None:  # (z, y, w, x) of the teacher: the first-timestep samples start from its noise z
            first = s == self.timesteps[0]
            k = int(first.sum())
            z_p, y_p, w_p, x_p = (v[:k] for v in pairs)
            x_s, y_fake, w = x_s.clone(), y.clone(), w.clone()
            x_s[first], y_fake[first], w[first] = z_p, y_p, w_p
        fake = self.denoise(x_s, s, w, y_fake)
        if pairs is not None and k:
            regress = F.mse_loss(fake[first], x_p)
        # distillation: re-noise x̂_θ, the teacher's guided x̃0 is the target
        t = torch.randint(0, len(self.alphas_cumprod), (b,), generator=generator)
        x_t = q_sample(fake.detach(), t, torch.randn(x0.shape, generator=generator), self.alphas_cumprod)
        target = self.teacher_x0(x_t, t, w, y_fake)
        weight = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        distill = (weight * (fake - target) ** 2).mean()
        # adversarial (hinge), the same random shift for real and generated images
        real_in = translate(x0, self.shift, generator) if self.shift else x0
        fake_in = translate(fake, self.shift, generator) if self.shift else fake
        d = self.discriminator
        loss_d = F.relu(1 - d(real_in, y)).mean() + F.relu(1 + d(fake_in.detach(), y_fake)).mean()
        if update_discriminator is not None:
            update_discriminator(loss_d)
        adv = -d(fake_in, y_fake).mean()
        loss_g = adv + self.distill_weight * distill
        parts = {"loss_d": loss_d.item(), "adv": adv.item(), "distill": distill.item()}
        if regress is not None:
            loss_g = loss_g + self.regression_weight * regress
            parts["regress"] = regress.item()
        return loss_d, loss_g, parts


TURBO_POOL = 2048  # (noise, label, w) → the teacher's sample: the pairs of the warm start
TURBO_POOL_STEPS = 10  # DDIM steps of the teacher for each pair (guided, η = 0: a deterministic map of the noise)
TURBO_REGRESSION_FRACTION = 0.4  # of the recipe's steps: the warm start; the rest is adversarial distillation
TURBO_REGRESSION_LR = 1e-3


def turbo_pairs(add: "AdversarialDistillation", n: int, generator: torch.Generator, steps: int = TURBO_POOL_STEPS,
                batch: int = 256):
    """n teacher pairs (z (n, C, H, W), y (n,) cycling over the classes, w (n,) ~ U[w_range], x = the teacher's
    ``steps``-step guided DDIM sample from z)."""
    shape = (add.teacher.config.in_channels, IMAGE_SIZE, IMAGE_SIZE)
    z = torch.randn((n, *shape), generator=generator)
    y = torch.arange(n) % add.teacher.config.num_classes
    w_min, w_max = add.w_range
    w = w_min + (w_max - w_min) * torch.rand(n, generator=generator)
    x = torch.cat([add.teacher_sample(z[i:i + batch], y[i:i + batch], w[i:i + batch], steps)
                   for i in range(0, n, batch)])
    return z, y, w, x


def pair_batches(pairs: tuple[torch.Tensor, ...], batch_size: int, generator: torch.Generator):
    """Endless random minibatches of ``pairs`` (tensors with the same first dimension), the same rows of each."""
    for idx in _batches(len(pairs[0]), min(batch_size, len(pairs[0])), generator):
        yield tuple(v[idx] for v in pairs)


def turbo_regression_loss(add: "AdversarialDistillation", pairs, generator: Optional[torch.Generator] = None):
    """The warm start's loss on a batch of teacher pairs: the student's x̂_θ regressed (MSE) on the teacher's sample x,
    from the pair's own noise z at the first timestep (with probability ``p_first``), else from x noised to one of
    the other student timesteps."""
    from fastdiff.models.losses import q_sample

    z, y, w, x = pairs
    s, _ = add._draw(len(z), generator)
    x_s = q_sample(x, s, torch.randn(x.shape, generator=generator), add.alphas_cumprod)
    x_s = torch.where((s == add.timesteps[0]).view(-1, 1, 1, 1), z, x_s)
    return F.mse_loss(add.denoise(x_s, s, w, y), x)


def run_turbo(out: Path, steps: int, seed: int, progress: bool, callback=None) -> dict:
    """One-step digits the SDXL-Turbo way: adversarial diffusion distillation of digits-ddpm (teacher) into an
    x0-predicting student (LCMScheduler, ``prediction_type="sample"``), started from digits-lcm's weights.

    1. pairs: the teacher's guided 10-step DDIM samples of ``TURBO_POOL`` noises (a deterministic map z → x);
    2. warm start (``TURBO_REGRESSION_FRACTION`` of the steps): the student regresses x from z in one step (and from x
       noised to its other timesteps) — an ε-predicting student cannot make one-step digits here: x̂0 amplifies its
       error by 1/√ᾱ_999 ≈ 160 (digits-lcm at one step: 72% correct);
    3. adversarial diffusion distillation (:class:`AdversarialDistillation`) for the rest, the regression kept as a
       third term. ``callback(phase, k, student)`` is called after every step (for experiments)."""
    import fastdiff
    from fastdiff.schedulers import LCMScheduler

    torch.manual_seed(seed)
    x, y = load_digits("train")
    teacher = fastdiff.load("digits-ddpm")
    init = fastdiff.load("digits-lcm")
    d = FeatureDiscriminator(fastdiff.load("digits-ldm").vae.encoder)
    add = AdversarialDistillation(teacher.unet, copy.deepcopy(init.unet), d, teacher.scheduler.alphas_cumprod,
                                  prediction_type="sample")
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    n_pool = min(TURBO_POOL, steps * ADD_BATCH)
    pool = turbo_pairs(add, n_pool, gen)
    pool_seconds = time.perf_counter() - start
    logger.info("digits-turbo: %d teacher pairs in %.0f s", n_pool, pool_seconds)
    pool_batches = pair_batches(pool, ADD_BATCH, gen)
    n_regression = max(1, round(steps * TURBO_REGRESSION_FRACTION))
    opt = _adam(add.student.parameters(), TURBO_REGRESSION_LR)
    sched = _warmup_cosine(opt, n_regression, warmup=min(50, n_regression))

    def regression_step(k):
        loss = turbo_regression_loss(add, next(pool_batches), gen)
        _update(opt, loss, sched, clip_params=add.student.parameters())
        if callback is not None:
            callback("regression", k, add.student)
        return {"regress": loss.item()}

    seconds = pool_seconds + _loop("digits-turbo warm start", n_regression, regression_step, progress)
    opt_g = _adam(add.student.parameters(), ADD_LR)
    opt_d = _adam([p for p in d.parameters() if p.requires_grad], ADD_LR_D, betas=(0.5, 0.999))
    ema = EMA(add.student, ADD_EMA_DECAY)
    batches = _batches(len(x), ADD_BATCH, gen)

    def step(k):
        idx = next(batches)
        _, loss_g, parts = add.losses(x[idx], y[idx], gen, update_discriminator=lambda loss_d: _update(opt_d, loss_d),
                                      pairs=next(pool_batches))
        _update(opt_g, loss_g, clip_params=add.student.parameters())  # D's gradients from it: cleared at D's step
        ema.update(add.student)
        if callback is not None:
            callback("adversarial", k, ema.model)
        return parts

    seconds += _loop("digits-turbo", max(0, steps - n_regression), step, progress)
    scheduler = LCMScheduler.from_config({**dict(init.scheduler.config), "prediction_type": "sample"})
    student = _save_student(out, ema.model, scheduler, "adversarial diffusion distillation of digits-ddpm "
                            "(x0-predicting student, guidance distilled in), LCMScheduler, one step", steps=1)
    return {"train_seconds": round(seconds), "train_steps": steps, "parameters": _count(student),
            "teacher_pairs": n_pool, "teacher_pair_steps": TURBO_POOL_STEPS, "pair_seconds": round(pool_seconds),
            "warm_start_steps": n_regression, "warm_start_lr": TURBO_REGRESSION_LR, "batch_size": ADD_BATCH,
            "lr": ADD_LR, "lr_discriminator": ADD_LR_D, "student_timesteps": list(ADD_TIMESTEPS),
            "p_first": ADD_P_FIRST, "distill_weight": ADD_DISTILL_WEIGHT, "w_range": list(LCM_W_RANGE),
            "ema_decay": ADD_EMA_DECAY, "shift": ADD_SHIFT,
            "loss": "hinge (D on digits-ldm's frozen VAE-encoder features) + λ·ᾱ_t-weighted MSE to the teacher's x̃0 "
                    "+ MSE to the teacher's pair"}

# --------------------------------------------------------------------------------------------- digits-sd (text)
SD_CLIP_STEPS = 600  # contrastive steps of the text encoder (stage 1)
SD_CLIP_BATCH = 256
SD_CLIP_LR = 1e-3
SD_PROMPT_DROPOUT = 0.1  # share of training prompts replaced by "" (the unconditional prompt of CFG)
SD_LR = 1e-3  # the latent UNet's peak learning rate (warm-started from digits-ldm's UNet)
SD_GUIDANCE = 3.0  # the shipped default guidance scale (measured: 4.0 gave Fréchet ratio 2.87, 3.0 gave 2.28)


def caption_batch(labels: torch.Tensor, words: list, generator: torch.Generator, p_drop: float = 0.0,
                  dropped: Optional[torch.Tensor] = None) -> list[str]:
    """One random caption per image (:func:`fastdiff.prompts.make_prompt` of its label and attribute words);
    captions of ``dropped`` images (a (B,) bool mask, or a fresh draw with probability ``p_drop``) are ""."""
    from fastdiff.prompts import make_prompt

    if dropped is None:
        dropped = torch.rand(len(labels), generator=generator) < p_drop
    return ["" if bool(d) else make_prompt(int(lab), w, generator)
            for lab, w, d in zip(labels.tolist(), words, dropped.tolist())]


@torch.no_grad()
def caption_states(pipe, labels: torch.Tensor, words: list, generator: torch.Generator, p_drop: float) -> torch.Tensor:
    """The frozen text encoder's hidden states (B, M, d) of one random caption per image (:func:`caption_batch`, a
    ``p_drop`` share of them ""), with ``pipe``'s tokenizer and text encoder."""
    dropped = torch.rand(len(labels), generator=generator) < p_drop
    tokens = pipe.tokenizer(caption_batch(labels, words, generator, dropped=dropped))
    return pipe.text_encoder(tokens["input_ids"], tokens["attention_mask"]).last_hidden_state


def train_text_encoder(text_encoder, tokenizer, x: torch.Tensor, y: torch.Tensor, words: list, steps: int,
                       seed: int, progress: bool, tower=None, name: str = "digits-sd/text-encoder"):
    """The CLIP way: ``text_encoder``'s ``text_embeds`` of each image's random caption against an image tower
    (:class:`fastdiff.models.ImageEncoder`), symmetric InfoNCE (:func:`fastdiff.models.clip_loss`) with a learned
    temperature. Stage 1 of digits-sd: ``tower=None``, a fresh tower (not shipped) is trained alongside the text
    encoder. With a ``tower`` given, the text encoder stays frozen and only the tower learns (the image encoder of
    digits-ip-adapter, aligned to digits-sd's words). Returns (the tower, logit scale, seconds); both end frozen."""
    from fastdiff.models import ImageEncoder
    from fastdiff.models.text_encoder import clip_loss

    gen = torch.Generator().manual_seed(seed + 1)
    train_text = tower is None
    if train_text:
        tower = ImageEncoder(projection_dim=text_encoder.config.projection_dim)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = [*(text_encoder.parameters() if train_text else ()), *tower.parameters(), log_scale]
    opt = _adam(params, SD_CLIP_LR)
    sched = _warmup_cosine(opt, steps, warmup=min(50, steps))
    batches = _batches(len(x), min(SD_CLIP_BATCH, len(x)), gen)
    text_encoder.train(train_text).requires_grad_(train_text)
    tower.train().requires_grad_(True)

    def step(k):
        idx = next(batches)
        tokens = tokenizer(caption_batch(y[idx], [words[i] for i in idx.tolist()], gen))
        with torch.set_grad_enabled(train_text):
            text = text_encoder(tokens["input_ids"], tokens["attention_mask"]).text_embeds
        loss = clip_loss(text, tower(x[idx]), log_scale.clamp(max=math.log(100)).exp())
        _update(opt, loss, sched, clip_params=params)
        return {"clip": loss.item()}

    seconds = _loop(name, steps, step, progress)
    text_encoder.eval().requires_grad_(False)
    return tower.eval().requires_grad_(False), float(log_scale.detach().clamp(max=math.log(100)).exp()), seconds


@torch.no_grad()
def zero_shot_accuracy(text_encoder, tokenizer, tower, x: torch.Tensor, y: torch.Tensor) -> float:
    """Held-out check of the contrastive pair: the share of images ``x`` whose nearest of the ten prompts
    "the digit 0" … "the digit 9" (cosine of the embeddings) names their label ``y``."""
    tokens = tokenizer([f"the digit {d}" for d in range(NUM_CLASSES)])
    text = F.normalize(text_encoder(tokens["input_ids"], tokens["attention_mask"]).text_embeds, dim=-1)
    image = F.normalize(tower(x), dim=-1)
    return float(((image @ text.T).argmax(1) == y).float().mean())


def warm_start(unet, source) -> int:
    """Copy every parameter/buffer of ``source`` whose name and shape ``unet`` shares; returns how many."""
    own = unet.state_dict()
    shared = {k: v for k, v in source.state_dict().items() if k in own and own[k].shape == v.shape}
    unet.load_state_dict(shared, strict=False)
    return len(shared)


def run_sd(out: Path, steps: int, seed: int, progress: bool) -> dict:
    """Text-to-image the Stable Diffusion way on the digits: (1) a word tokenizer and a small transformer text
    encoder trained contrastively against an image tower (CLIP), then frozen; (2) a latent UNet with cross-attention
    to the encoder's hidden states (``context_dim``), warm-started from digits-ldm's UNet where names and shapes
    match, on digits-ldm's VAE latents, with prompt dropout (10% "") for classifier-free guidance."""
    import fastdiff
    from fastdiff.models import TextEncoder, UNet, WordTokenizer
    from fastdiff.pipelines import TextToImagePipeline
    from fastdiff.prompts import ATTRIBUTE_THRESHOLDS, attribute_words, digit_attributes

    torch.manual_seed(seed)
    x, y = load_digits("train")
    words = attribute_words(digit_attributes(x))
    tokenizer = WordTokenizer()
    text_encoder = TextEncoder(max_length=tokenizer.max_length)
    clip_steps = max(1, min(SD_CLIP_STEPS, steps // 4))
    tower, logit_scale, clip_seconds = train_text_encoder(text_encoder, tokenizer, x, y, words, clip_steps, seed,
                                                          progress)
    x_test, y_test = load_digits("test")
    zero_shot = zero_shot_accuracy(text_encoder, tokenizer, tower, x_test, y_test)

    base = fastdiff.load("digits-ldm")
    vae = base.vae
    latents = _encode_all(lambda b: vae.encode(b).mode(), x) * vae.config.scaling_factor
    unet = UNet(in_channels=latents.shape[1], out_channels=latents.shape[1], base_channels=32,
                channel_mult=(1, 2, 2), layers_per_block=1, attention_levels=(0,), mid_attention=True,
                attention_head_dim=16, norm_num_groups=8, context_dim=text_encoder.config.hidden_size)
    # cross-attention at the 8×8 level (32 channels) and in the middle block: at the 4×4 level (64 channels) the
    # transformer blocks would take the folder past 8 MB
    copied = warm_start(unet, base.unet)
    gen = torch.Generator().manual_seed(seed + 2)

    def context_fn(idx, dropped):
        prompts = caption_batch(y[idx], [words[i] for i in idx.tolist()], gen, dropped=dropped)
        with torch.no_grad():
            tokens = tokenizer(prompts)
            return text_encoder(tokens["input_ids"], tokens["attention_mask"]).last_hidden_state

    unet, scheduler, unet_seconds = _train_diffusion(unet, latents, y, steps, seed, progress, "digits-sd/unet",
                                                     lr=SD_LR, p_uncond=SD_PROMPT_DROPOUT, context_fn=context_fn)
    pipe = TextToImagePipeline(unet, vae, _ddim_like(scheduler), text_encoder, tokenizer,
                               sample_size=latents.shape[-1])
    _settings(pipe, "text-to-image latent diffusion: word tokenizer + transformer text encoder (CLIP-trained) → "
              "cross-attention UNet on digits-ldm's AutoencoderKL latents, CFG with the empty prompt", steps=25,
              guidance=SD_GUIDANCE)
    pipe.save_pretrained(out)
    return {"train_seconds": round(clip_seconds + unet_seconds), "text_encoder_steps": clip_steps,
            "text_encoder_seconds": round(clip_seconds), "clip_batch_size": SD_CLIP_BATCH,
            "clip_logit_scale": round(logit_scale, 2), "zero_shot_digit_accuracy": round(zero_shot, 4),
            "unet_steps": steps, "unet_lr": SD_LR, "prompt_dropout": SD_PROMPT_DROPOUT,
            "warm_started_tensors": copied, "parameters": _count(unet) + _count(vae) + _count(text_encoder),
            "vocabulary_size": len(tokenizer.vocabulary),
            "max_length": tokenizer.max_length,
            "attribute_thresholds": {k: [round(v, 4) for v in pair] for k, pair in ATTRIBUTE_THRESHOLDS.items()}}


# --------------------------------------------------------------------------------------------- digits-controlnet
CN_LR = 5e-4
CN_BATCH = 128
CN_PROMPT_DROPOUT = 0.3  # captions replaced by "": the ControlNet learns to follow the map without words too
CN_EMBEDDING = (16, 32)  # conditioning embedding channels: a 16×16 edge map → the 8×8 latent grid


def _frozen_digits_sd(seed: int):
    """What a model trained on top of the shipped digits-sd starts from (after seeding torch with ``seed``): the
    train digits x (N, 1, 16, 16) and labels y, each image's attribute words, digits-sd itself with its UNet frozen,
    and the digits' scaled VAE latents (N, C, h, w)."""
    import fastdiff
    from fastdiff.prompts import attribute_words, digit_attributes

    torch.manual_seed(seed)
    x, y = load_digits("train")
    words = attribute_words(digit_attributes(x))
    base = fastdiff.load("digits-sd")
    base.unet.eval().requires_grad_(False)
    vae = base.vae
    latents = _encode_all(lambda b: vae.encode(b).mode(), x) * vae.config.scaling_factor
    return x, y, words, base, latents


def _add_on_training(model, lr: float, steps: int, n: int, batch_size: int, seed: int):
    """The training state of a model added to the frozen digits-sd: (generator seeded with ``seed``, AdamW at
    ``lr``, warm-up + cosine schedule over ``steps``, EMA 0.999 of ``model``, endless minibatch indices of n)."""
    gen = torch.Generator().manual_seed(seed)
    opt = _adam(model.parameters(), lr)
    return gen, opt, _warmup_cosine(opt, steps), EMA(model, 0.999), _batches(n, batch_size, gen)


def run_controlnet(out: Path, steps: int, seed: int, progress: bool) -> dict:
    """A ControlNet on the shipped digits-sd, conditioned on the digit's edge map (:func:`fastdiff.control.edge_map`:
    the outline of the binarized ink). The ControlNet starts as a copy of digits-sd's UNet encoder and middle block
    (zero convolutions out), the UNet, VAE and text encoder stay frozen; ε-prediction loss on digits-sd's latents
    with random captions (30% dropped to "")."""
    from fastdiff.control import edge_map
    from fastdiff.models import ControlNet, losses

    x, y, words, base, latents = _frozen_digits_sd(seed)
    unet = base.unet
    edges = edge_map(x)
    controlnet = ControlNet.from_unet(unet, conditioning_channels=1, conditioning_embedding_out_channels=CN_EMBEDDING)
    controlnet.train().requires_grad_(True)
    alphas_cumprod = base.scheduler.alphas_cumprod
    gen, opt, sched, ema, batches = _add_on_training(controlnet, CN_LR, steps, len(x), CN_BATCH, seed)

    def controlled(x_t, t, context, control):
        down, mid = controlnet(x_t, t, controlnet_cond=control, context=context)
        return unet(x_t, t, context=context, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid)

    def step(k):
        idx = next(batches)
        context = caption_states(base, y[idx], [words[i] for i in idx.tolist()], gen, CN_PROMPT_DROPOUT)
        t = torch.randint(0, len(alphas_cumprod), (len(idx),), generator=gen)
        noise = torch.randn(latents[idx].shape, generator=gen)
        loss = losses.ddpm_loss(controlled, latents[idx], t, noise, alphas_cumprod, context=context,
                                control=edges[idx])
        _update(opt, loss, sched, clip_params=controlnet.parameters())
        ema.update(controlnet)
        return {"loss": loss.item()}

    seconds = _loop("digits-controlnet", steps, step, progress)
    _save_controlnet(out, ema.model)
    return {"train_seconds": round(seconds), "train_steps": steps, "parameters": _count(ema.model),
            "batch_size": CN_BATCH, "lr": CN_LR, "prompt_dropout": CN_PROMPT_DROPOUT,
            "conditioning_embedding_out_channels": list(CN_EMBEDDING), "base_model": "digits-sd",
            "control": "edge map: the outline of the binarized ink (fastdiff.control.edge_map)"}


def _save_controlnet(out: Path, controlnet) -> None:
    """The ControlNet folder: ``controlnet/`` and a ``model_index.json`` naming digits-sd as its base model."""
    from fastdiff.pipelines import save_extension

    save_extension(out, "digits-sd", {"controlnet": controlnet.eval().requires_grad_(False)},
                   settings={"description": "ControlNet on digits-sd: the digit's edge map (fastdiff.control.edge_map) "
                                            "steers the layout, the prompt the rest",
                             "default_controlnet_conditioning_scale": 1.0})


# --------------------------------------------------------------------------------------------- digits-ip-adapter
IP_TOKENS = 4  # image tokens per image prompt
IP_ENCODER_STEPS = 400  # contrastive steps of the image encoder against digits-sd's frozen text encoder
IP_LR = 1e-3
IP_BATCH = 128
IP_TEXT_DROPOUT = 0.5  # captions replaced by "": the adapter learns to carry the image alone (empty text prompt)
IP_IMAGE_DROPOUT = 0.1  # image embeddings zeroed: the unconditional image input of classifier-free guidance


def run_ip_adapter(out: Path, steps: int, seed: int, progress: bool) -> dict:
    """An IP-Adapter on the shipped digits-sd. (1) An image encoder (:class:`fastdiff.models.ImageEncoder`) trained
    contrastively against digits-sd's frozen text encoder, so its embedding speaks the words' language (digit,
    thickness, slant), as a CLIP image tower does; then frozen. (2) The adapter (``IPAdapter.from_unet``: image
    projection to 4 tokens, per cross-attention layer image key/value projections initialised from the text ones)
    learns the ε-prediction loss with the UNet, VAE and both encoders frozen; the image prompt is the training image
    itself, its caption dropped to "" half of the time and its embedding zeroed 10% of the time."""
    from fastdiff.models import ImageEncoder, IPAdapter, losses

    x, y, words, base, latents = _frozen_digits_sd(seed)
    unet, text_encoder, tokenizer = base.unet, base.text_encoder, base.tokenizer

    encoder_steps = max(1, min(IP_ENCODER_STEPS, steps // 4))
    encoder = ImageEncoder(in_channels=x.shape[1], sample_size=x.shape[-1],
                           projection_dim=text_encoder.config.projection_dim)
    encoder, logit_scale, encoder_seconds = train_text_encoder(
        text_encoder, tokenizer, x, y, words, encoder_steps, seed, progress, tower=encoder,
        name="digits-ip-adapter/image-encoder")
    x_test, y_test = load_digits("test")
    zero_shot = zero_shot_accuracy(text_encoder, tokenizer, encoder, x_test, y_test)
    with torch.no_grad():
        embeds = _encode_all(encoder, x)  # (N, D): the encoder is frozen

    adapter = IPAdapter.from_unet(unet, image_embed_dim=embeds.shape[1], num_tokens=IP_TOKENS)
    adapter.train().requires_grad_(True)
    adapter.attach(unet)
    alphas_cumprod = base.scheduler.alphas_cumprod
    gen, opt, sched, ema, batches = _add_on_training(adapter, IP_LR, steps, len(x), IP_BATCH, seed)

    def step(k):
        idx = next(batches)
        context = caption_states(base, y[idx], [words[i] for i in idx.tolist()], gen, IP_TEXT_DROPOUT)
        keep = (torch.rand(len(idx), generator=gen) >= IP_IMAGE_DROPOUT).float()[:, None]
        image_tokens = adapter(embeds[idx] * keep)
        t = torch.randint(0, len(alphas_cumprod), (len(idx),), generator=gen)
        noise = torch.randn(latents[idx].shape, generator=gen)
        with adapter.conditioned(image_tokens):
            loss = losses.ddpm_loss(unet, latents[idx], t, noise, alphas_cumprod, context=context)
        _update(opt, loss, sched, clip_params=adapter.parameters())
        ema.update(adapter)
        return {"loss": loss.item()}

    try:
        seconds = _loop("digits-ip-adapter", steps, step, progress)
    finally:
        adapter.detach(unet)
    _save_ip_adapter(out, encoder, ema.model)
    return {"train_seconds": round(encoder_seconds + seconds), "image_encoder_steps": encoder_steps,
            "image_encoder_seconds": round(encoder_seconds), "clip_logit_scale": round(logit_scale, 2),
            "image_encoder_zero_shot_digit_accuracy": round(zero_shot, 4), "adapter_steps": steps,
            "parameters": _count(encoder) + _count(ema.model), "num_tokens": IP_TOKENS, "batch_size": IP_BATCH,
            "lr": IP_LR, "text_dropout": IP_TEXT_DROPOUT, "image_dropout": IP_IMAGE_DROPOUT,
            "base_model": "digits-sd"}


def _save_ip_adapter(out: Path, encoder, adapter) -> None:
    """The IP-Adapter folder: ``image_encoder/``, ``ip_adapter/`` and a ``model_index.json`` naming digits-sd."""
    from fastdiff.pipelines import save_extension

    save_extension(out, "digits-sd", {"image_encoder": encoder.eval().requires_grad_(False),
                                      "ip_adapter": adapter.eval().requires_grad_(False)},
                   settings={"description": "IP-Adapter on digits-sd: an image prompt (a digit image) steers the "
                                            "digit and its style through decoupled cross-attention",
                             "default_ip_adapter_scale": 1.0})


LOSS_WORDS = {"bce": "non-saturating BCE", "hinge": "hinge", "wgan-gp": "WGAN-GP"}
GAN_LOSSES = tuple(LOSS_WORDS)  # the losses `fastdiff train <gan recipe> --loss` selects


@dataclass
class GANTraining:
    """How a GAN recipe trains (:func:`train_gan`).

    loss: "bce" (the chapter's non-saturating BCE on logits), "hinge", or "wgan-gp" (the discriminator is a critic:
    raw scores, no sigmoid; E[D(fake)] − E[D(real)] + gp_weight · gradient penalty, ``n_critic`` critic steps per
    generator step). r1_gamma > 0 adds (γ/2)·R1 on the real images every ``r1_every`` discriminator steps (lazy
    regularisation, scaled by the interval) for bce/hinge. Every image the discriminator sees is shifted by up to
    ±``shift`` px (the same differentiable augmentation for real and generated images). ``mixing_prob``: style-mixing
    regularisation for a StyleGenerator. ``reuse_fakes`` (with n_critic = 1): one batch of generated images serves
    the discriminator step (detached) and the generator step, as the chapter's DCGAN loop does; else the generator
    step draws a fresh batch. Invalid settings raise ValueError/TypeError naming the field."""

    loss: str = "bce"
    n_critic: int = 1
    gp_weight: float = 10.0
    r1_gamma: float = 0.0
    r1_every: int = 4
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    betas: tuple = (0.5, 0.999)
    batch_size: int = 64
    shift: int = 2
    ema_decay: float = 0.999
    mixing_prob: float = 0.0
    reuse_fakes: bool = False

    def __post_init__(self):
        check_choice("loss", self.loss, GAN_LOSSES)
        for name in ("n_critic", "r1_every", "batch_size"):
            check_positive_int(name, getattr(self, name))
        check_int("shift", self.shift, 0)
        for name in ("gp_weight", "r1_gamma"):
            check_real(name, getattr(self, name), nonneg=True)
        for name in ("lr_g", "lr_d"):
            check_real(name, getattr(self, name), positive=True)
        for name in ("ema_decay", "mixing_prob"):
            check_fraction(name, getattr(self, name))
        if (not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2
                or not all(0.0 <= check_real("betas", b) < 1.0 for b in self.betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = tuple(float(b) for b in self.betas)
        check_bool("reuse_fakes", self.reuse_fakes)

    def summary(self) -> dict:
        """The settings that matter for the model card."""
        out = {"loss": self.loss, "lr_g": self.lr_g, "lr_d": self.lr_d, "betas": list(self.betas),
               "batch_size": self.batch_size, "augmentation_shift_px": self.shift, "ema_decay": self.ema_decay}
        if self.loss == "wgan-gp":
            out.update(n_critic=self.n_critic, gp_weight=self.gp_weight)
        elif self.r1_gamma:
            out.update(r1_gamma=self.r1_gamma, r1_every=self.r1_every)
        if self.mixing_prob:
            out["style_mixing_prob"] = self.mixing_prob
        return out


def _gan_losses(loss: str):
    from fastdiff.models import losses

    return {"bce": (losses.gan_discriminator_loss, losses.gan_generator_loss),
            "hinge": (losses.hinge_discriminator_loss, losses.hinge_generator_loss),
            "wgan-gp": (losses.wgan_discriminator_loss, losses.wgan_generator_loss)}[loss]


def train_gan(g, d, x: torch.Tensor, steps: int, seed: int, progress: bool, name: str, cfg: GANTraining,
              callback: Optional[Callable[[int, torch.nn.Module], None]] = None):
    """Adversarial training of generator ``g`` against ``d`` on images ``x`` (N, C, H, W) in [−1, 1] for ``steps``
    generator steps. Returns (seconds, the EMA of g). ``callback(step, ema_model)`` runs after every step."""
    from fastdiff.models import losses

    if not isinstance(cfg, GANTraining):
        raise TypeError(f"cfg must be a GANTraining, got {type(cfg).__name__}")
    steps = check_positive_int("steps", steps)
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not 1 <= cfg.batch_size <= len(x):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be images (N, C, H, W) with N ≥ batch_size = {cfg.batch_size}, got {shape}")
    loss_d_fn, loss_g_fn = _gan_losses(cfg.loss)
    gen = torch.Generator().manual_seed(seed)
    opt_g = _adam(g.parameters(), cfg.lr_g, betas=cfg.betas)
    opt_d = _adam(d.parameters(), cfg.lr_d, betas=cfg.betas)
    ema = EMA(g, cfg.ema_decay)
    batches = _batches(len(x), cfg.batch_size, gen)
    styled = hasattr(g, "mixed_ws")
    reuse = cfg.reuse_fakes and cfg.n_critic == 1
    g.train(), d.train()
    d_steps = 0

    def fake_images(b):
        z = torch.randn(b, g.config.latent_dim, generator=gen)
        return g.synthesis(g.mixed_ws(z, cfg.mixing_prob, gen)) if styled else g(z)

    def augment(images):
        return translate(images, cfg.shift, gen) if cfg.shift else images

    def step(k):
        nonlocal d_steps
        log = {}
        for _ in range(cfg.n_critic):
            idx = next(batches)
            if reuse:  # this batch of fakes also feeds the generator step
                fake_g = fake_images(len(idx))
                real, fake = augment(x[idx]), augment(fake_g.detach())
            else:
                real = augment(x[idx])
                with torch.no_grad():
                    fake = augment(fake_images(len(real)))
            loss_d = loss_d_fn(d(real), d(fake))
            log["loss_d"] = loss_d.item()
            if cfg.loss == "wgan-gp":
                gp = losses.gradient_penalty(d, real, fake, generator=gen)
                log["gp"] = gp.item()
                loss_d = loss_d + cfg.gp_weight * gp
            elif cfg.r1_gamma and d_steps % cfg.r1_every == 0:
                r1 = losses.r1_penalty(d, real)
                log["r1"] = r1.item()
                loss_d = loss_d + 0.5 * cfg.r1_gamma * cfg.r1_every * r1
            _update(opt_d, loss_d)
            d_steps += 1
        d.requires_grad_(False)  # the generator step needs no discriminator gradients
        loss_g = loss_g_fn(d(augment(fake_g if reuse else fake_images(cfg.batch_size))))
        _update(opt_g, loss_g)
        d.requires_grad_(True)
        ema.update(g)
        if callback is not None:
            callback(k, ema.model)
        return {**log, "loss_g": loss_g.item()}

    return _loop(name, steps, step, progress), ema.model


DCGAN_TRAINING = GANTraining(reuse_fakes=True)  # the loop that trained the shipped digits-dcgan
# what `--loss` changes besides the loss: WGAN-GP's own optimiser settings (Gulrajani et al.: Adam 1e-4, β = (0, 0.9),
# five critic steps per generator step)
_LOSS_DEFAULTS = {"bce": {}, "hinge": {}, "wgan-gp": {"n_critic": 5, "lr_g": 1e-4, "lr_d": 1e-4, "betas": (0.0, 0.9)}}


def run_dcgan(out: Path, steps: int, seed: int, progress: bool, loss: Optional[str] = None) -> dict:
    """DCGAN with non-saturating BCE losses. 1,438 training images are few for a GAN: the discriminator memorises them
    (without augmentation: D loss → 0.02 and a Fréchet ratio of 8.6 at 12,000 steps). Both real and generated images
    are shifted by up to ±2 px before the discriminator sees them (the same differentiable augmentation for both, so
    the generator is not pushed to make shifted digits): ratio 2.15 at 12,000 steps in the experiment that chose it.
    ``loss`` selects another GAN loss (:data:`GAN_LOSSES`)."""
    from fastdiff.models import DCGANDiscriminator, DCGANGenerator
    from fastdiff.pipelines import GANPipeline

    torch.manual_seed(seed)
    x, _ = load_digits("train")
    cfg = DCGAN_TRAINING if loss is None else dataclasses.replace(DCGAN_TRAINING, loss=loss, **_LOSS_DEFAULTS[loss])
    g = DCGANGenerator(resolution=IMAGE_SIZE, latent_dim=64, channels=1, width=32)
    # WGAN-GP: a critic without batch norm, whose gradient penalty is per sample
    d = DCGANDiscriminator(resolution=IMAGE_SIZE, latent_dim=64, channels=1, width=32,
                           norm="layer" if cfg.loss == "wgan-gp" else "batch")
    seconds, g_ema = train_gan(g, d, x, steps, seed, progress, "digits-dcgan", cfg)
    pipe = GANPipeline(g_ema)
    _settings(pipe, f"DCGAN (16×16 digits, {LOSS_WORDS[cfg.loss]} losses, ±{cfg.shift} px translation augmentation "
                    "for D)")
    pipe.save_pretrained(out)
    return {"train_seconds": round(seconds), "train_steps": steps, "parameters": _count(g), **cfg.summary()}


# digits-stylegan: the generator and critic sizes, and how it trains (chosen by the experiments in run_stylegan's
# docstring)
STYLEGAN_GENERATOR = dict(resolution=IMAGE_SIZE, latent_dim=64, w_dim=64, mapping_layers=8, channels=1,
                          base_channels=16, max_channels=64)  # 64 channels at 4×4, 32 at 8×8, 16 at 16×16
STYLEGAN_CRITIC = dict(resolution=IMAGE_SIZE, channels=1, base_channels=16, max_channels=64)
STYLEGAN_TRAINING = GANTraining(loss="bce", r1_gamma=0.05, lr_g=2e-3, lr_d=2e-3, betas=(0.0, 0.99), batch_size=32,
                                mixing_prob=0.9)


def run_stylegan(out: Path, steps: int, seed: int, progress: bool, loss: Optional[str] = None) -> dict:
    """StyleGAN (modulated convolutions, 8-layer mapping network at 0.01× learning rate, per-layer noise) against
    StyleGAN2's residual critic with minibatch standard deviation; non-saturating BCE with lazy R1 (γ = 0.05, every
    4th critic step), style-mixing regularisation (90% of the generated images cross over to a second w at a random
    layer), ±2 px translation augmentation for the critic, EMA of the generator. ``loss`` selects another GAN loss
    (:data:`GAN_LOSSES`; "wgan-gp" trains the critic with the gradient penalty, 2 critic steps per generator step).

    The experiments that chose it (one pinned thread each, Fréchet ratio of 500 EMA samples, lower is better):
    the generator without equalised learning rates in its mapping network, with DCGAN's discriminator and Adam 1e-4
    / 2e-4, stalled at 18.3 (WGAN-GP) and 33 (BCE, collapsed onto a few digits) after 12 minutes. With equalised
    learning rates everywhere, Adam 2e-3, β = (0, 0.99) and this critic: 32 channels at 16×16 and batch 64 reached
    4.47 at 12 minutes (1,509 steps); WGAN-GP (n_critic 2, lr 1e-3) 12.1 at 6 minutes; 16 channels at 16×16 (half
    the cost per step) 3.12 at 10 minutes and 1.71 at 15; the same with batch 32, 2.18 at 10 minutes (5,083 steps):
    the recipe."""
    from fastdiff.models import StyleDiscriminator, StyleGenerator
    from fastdiff.pipelines import GANPipeline

    torch.manual_seed(seed)
    x, _ = load_digits("train")
    cfg = STYLEGAN_TRAINING
    if loss is not None and loss != cfg.loss:  # WGAN-GP: the gradient penalty instead of R1, 2 critic steps
        cfg = dataclasses.replace(cfg, loss=loss, **({"r1_gamma": 0.0, "n_critic": 2} if loss == "wgan-gp" else {}))
    g, d = StyleGenerator(**STYLEGAN_GENERATOR), StyleDiscriminator(**STYLEGAN_CRITIC)
    seconds, g_ema = train_gan(g, d, x, steps, seed, progress, "digits-stylegan", cfg)
    pipe = GANPipeline(g_ema)
    _settings(pipe, f"StyleGAN (16×16 digits, modulated convolutions, {LOSS_WORDS[cfg.loss]} losses)")
    pipe.save_pretrained(out)
    return {"train_seconds": round(seconds), "train_steps": steps, "parameters": _count(g),
            "critic_parameters": _count(d), **cfg.summary()}


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
    "digits-dcgan": Recipe("DCGAN with ±2 px translation augmentation for the discriminator", 12000, run_dcgan,
                           options=("loss",)),
    "digits-stylegan": Recipe("StyleGAN: an 8-layer mapping network z → w, styles injected by modulated "
                              "convolutions (StyleGAN2) into a synthesis network from a learned constant, per-layer "
                              "noise, style-mixing regularisation, a residual critic with minibatch std, ±2 px "
                              "translation augmentation", 10000, run_stylegan, options=("loss",)),
    "digits-classifier": Recipe("digit classifier for fastdiff eval", 1500, run_classifier),
    # 1500 steps: 1.08 s per step measured (batch 64, one thread, the machine busy with other jobs) → 27 min
    "digits-lcm": Recipe("latent-consistency distillation of digits-ddpm for 1–4-step sampling", 1500, run_lcm),
    # 1500 steps: 1,429 s measured on one thread (116 s of teacher pairs, 600 warm-start steps, 900 ADD steps)
    "digits-turbo": Recipe("adversarial diffusion distillation (ADD, the SDXL-Turbo recipe) of digits-ddpm for "
                           "one-step sampling: an x0-predicting student warm-started on 2,048 pairs (noise → the "
                           "teacher's guided 10-step DDIM sample), then the adversarial loss (a discriminator on the "
                           "frozen features of digits-ldm's VAE encoder) plus the distillation loss against the "
                           "teacher's denoised prediction", 1500, run_turbo),
    "digits-sd": Recipe("text-to-image latent diffusion (the Stable Diffusion data path): prompts built from each "
                        "digit's label and measured attributes, a word tokenizer and a transformer text encoder "
                        "trained contrastively (CLIP) then frozen, a cross-attention latent UNet on digits-ldm's "
                        "VAE latents with prompt dropout for classifier-free guidance", 3000, run_sd),
    "digits-controlnet": Recipe("ControlNet on digits-sd conditioned on the digit's edge map (the outline of its "
                                "binarized ink): a trainable copy of the UNet encoder and middle block joined to the "
                                "frozen UNet by zero-initialised convolutions", 2000, run_controlnet),
    "digits-ip-adapter": Recipe("IP-Adapter on digits-sd: an image encoder trained contrastively against the frozen "
                                "text encoder, its embedding projected to 4 image tokens that a decoupled "
                                "cross-attention (its own keys and values, added to the text cross-attention) "
                                "reads in every cross-attention layer of the frozen UNet", 3000, run_ip_adapter),
}


def gan_recipes() -> list[str]:
    """The recipes that take a GAN loss (``loss=`` / ``--loss``), sorted."""
    return sorted(k for k, r in RECIPES.items() if "loss" in r.options)


def _settings(pipe, description: str, steps: Optional[int] = None, guidance: Optional[float] = None) -> None:
    pipe.settings["description"] = description
    if steps is not None:
        pipe.settings["default_steps"] = steps
    if guidance is not None:
        pipe.settings["default_guidance_scale"] = guidance
    pipe.settings["grid_scale"] = 4


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def train(name: str, out: Path, steps: Optional[int] = None, seed: int = 0, progress: bool = True,
          loss: Optional[str] = None) -> dict:
    """Train recipe ``name`` into folder ``out``; returns the metrics written to ``out/train_metrics.json``.
    ``loss``: the GAN recipes' loss, one of :data:`GAN_LOSSES` (default: the recipe's own)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}")
    recipe = RECIPES[name]
    options = {}
    if loss is not None:
        if "loss" not in recipe.options:
            raise ValueError(f"loss: recipe {name!r} has no choice of GAN loss (the GAN recipes: "
                             f"{', '.join(gan_recipes())})")
        options["loss"] = check_choice("loss", loss, GAN_LOSSES)
    steps = steps or recipe.steps
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = recipe.run(out, steps, seed, progress, **options)
    metrics.update({"recipe": name, "seed": seed, "torch": torch.__version__,
                    "threads": torch.get_num_threads()})
    write_json_atomic(out / "train_metrics.json", metrics)
    write_model_card(out)
    write_checksums(out)  # the sha256 of every weight file, checked when the folder is loaded
    logger.info("%s: trained in %s s → %s", name, metrics["train_seconds"], out)
    return metrics


DATA_CARD = (
    "scikit-learn's bundled handwritten digits (`sklearn.datasets.load_digits`: 1,797 grayscale 8×8 images, pixel "
    "values 0–16; nothing downloaded). Split once with a fixed seed (0): 1,438 train / 359 held out; only the "
    "train split is used for training."
)
PREPROCESSING_CARD = "pixels / 16 → bilinear upscaling 8×8 → 16×16 → scaled to [−1, 1]. Images are 16×16, 1 channel."


_SAMPLER_WORDS = {"DDIMScheduler": "DDIM", "LCMScheduler": "LCM", "DDPMScheduler": "DDPM"}  # the card's sampler name


def _control_card(evaluation: dict) -> list[str]:
    """The model card's lines of a ControlNet evaluation (:func:`fastdiff.evaluation.evaluate_control`)."""
    c, b = evaluation["controlled"], evaluation["baseline"]
    return [f"  - control: {evaluation['control']}; conditioning scale {evaluation['scale']}", "",
            "    | sampling | edge IoU with the control ↑ | Chamfer distance (px) ↓ | named digit | Fréchet ratio |",
            "    |---|---:|---:|---:|---:|",
            f"    | with the edge map | {c['iou']:.3f} | {c['chamfer']:.3f} | {100 * c['accuracy']:.1f}% | "
            f"{c['fd_ratio']:.2f} |",
            f"    | without (digits-sd, same prompts and noises) | {b['iou']:.3f} | {b['chamfer']:.3f} | "
            f"{100 * b['accuracy']:.1f}% | {b['fd_ratio']:.2f} |", "",
            f"  - IoU {evaluation['iou_ratio']:.2f}× the baseline's, Chamfer distance "
            f"{evaluation['chamfer_ratio']:.2f}× lower; targets: "
            + ", ".join(f"{k}: {'met' if v else 'missed'}" for k, v in evaluation["targets"].items())]


def _image_prompt_card(evaluation: dict) -> list[str]:
    """The model card's lines of an IP-Adapter evaluation (:func:`fastdiff.evaluation.evaluate_image_prompts`)."""
    from fastdiff.evaluation import format_image_prompt_report

    table = format_image_prompt_report("", evaluation).split("\n")[2:]
    return [f"  - {evaluation['prompt']}; ip_adapter_scale {evaluation['scale']}", ""] + [
        f"    {line}" if line.startswith("|") else f"  - {line.strip()}" if line.strip() else line for line in table]


def _prompt_card(evaluation: dict) -> list[str]:
    """The model card's lines of a text-to-image evaluation (:func:`fastdiff.evaluation.evaluate_prompts`)."""
    lines = [f"  - prompt adherence ({evaluation['per_attribute']} samples per prompt kind, digits 0–9 cycling, the "
             "same initial noises for every kind; mass and slant measured by `fastdiff.prompts.digit_attributes`):",
             "", "    | prompt | mean mass | mean slant (°) | named digit |", "    |---|---:|---:|---:|"]
    for row in evaluation["attributes"].values():
        lines.append(f"    | `{row['prompt']}` | {row['mass']:.4f} | {row['slant']:+.2f} | "
                     f"{100 * row['accuracy']:.1f}% |")
    neg = evaluation["negative"]
    lines += ["", f"  - bold/thin mean-mass ratio {evaluation['bold_thin_mass_ratio']:.3f}; the prompts \"0\" … \"9\" "
              f"have mean mass {neg['none']:.4f}, {neg['bold']:.4f} with the negative prompt \"bold\" and "
              f"{neg['thin']:.4f} with \"thin\"",
              "  - targets: " + ", ".join(f"{k}: {'met' if v else 'missed'}" for k, v in evaluation["targets"].items())]
    return lines


def _vocabulary_card(metrics: dict) -> list[str]:
    """The model card's prompt section: attribute thresholds, templates, synonyms and the vocabulary."""
    from fastdiff.prompts import DIGIT_WORDS, SLANT_SYNONYMS, TEMPLATES, THICKNESS_SYNONYMS, VOCABULARY

    (m_lo, m_hi), (s_lo, s_hi) = metrics["attribute_thresholds"]["mass"], metrics["attribute_thresholds"]["slant"]
    return [
        "", "## Prompts", "",
        "Each training image gets a new random caption at every step (`fastdiff.prompts.make_prompt`) from its label "
        "and two attributes measured on the image (`fastdiff.prompts.digit_attributes`): **mass**, the mean ink "
        "(0 blank … 1 full), and **slant**, the angle from vertical of the ink's main axis in degrees (positive: the "
        "top leans right). The cut points are the quartiles of the train split:",
        "",
        f"- thickness: mass ≤ {m_lo:.4f} → \"thin\", mass > {m_hi:.4f} → \"bold\", the middle half gets no word",
        f"- slant: ≤ {s_lo:.2f}° → \"slanted left\", > {s_hi:.2f}° → \"slanted right\", else \"upright\"",
        "- synonyms: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in {**THICKNESS_SYNONYMS, **SLANT_SYNONYMS}.items()),
        "- digits: the numeral or the word (" + ", ".join(w for ws in DIGIT_WORDS.values() for w in ws[1:]) + ")",
        "- templates ({d} digit, {t} thickness, {s} slant; the kind is drawn among those the words allow): "
        + " · ".join(f"`{t}`" for ts in TEMPLATES.values() for t in ts),
        f"- prompt dropout: {100 * metrics.get('prompt_dropout', 0):.0f}% of the captions are \"\" (the "
        "unconditional prompt of classifier-free guidance and the default negative prompt)",
        f"- tokenizer: {len(VOCABULARY)} words + [PAD] [UNK] [BOS] [EOS], max length {metrics.get('max_length')} "
        "tokens (longer prompts are truncated with a warning, unknown words become [UNK] with a warning once): "
        + " ".join(f"`{w}`" for w in VOCABULARY),
    ]


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
                     + (f", {evaluation['steps']} {_SAMPLER_WORDS.get(evaluation.get('sampler'), 'DDIM')} "
                        f"step{'s' if evaluation['steps'] != 1 else ''}"
                        if evaluation.get("steps") else "")
                     + (f", guidance {evaluation['guidance']}" if evaluation.get("guidance") is not None else "")
                     + "):")
        if "controlled" in evaluation:
            lines += _control_card(evaluation)
        elif "image_prompted" in evaluation:
            lines += _image_prompt_card(evaluation)
        elif "accuracy" in evaluation:
            lines.append(f"  - classified as the requested digit by the shipped classifier: "
                         f"{100 * evaluation['accuracy']:.1f}%")
        if "fd" in evaluation:
            lines.append(f"  - Fréchet distance in the classifier's features vs the held-out digits: "
                         f"{evaluation['fd']:.2f} (real train vs held-out: {evaluation['fd_real']:.2f}; ratio "
                         f"{evaluation['fd_ratio']:.2f})")
            lines.append(f"  - class histogram of the samples (0–9): {evaluation['histogram']}")
            if "accuracy" not in evaluation:  # unconditional: how evenly the digits come out (mode collapse)
                hist = evaluation["histogram"]
                low = min(range(len(hist)), key=hist.__getitem__)
                lines.append(f"  - smallest digit share: {100 * hist[low] / sum(hist):.1f}% (digit {low}); an "
                             f"even spread is 10% each")
        if "attributes" in evaluation:
            lines += _prompt_card(evaluation)
    if "attribute_thresholds" in metrics:
        lines += _vocabulary_card(metrics)
    path = folder / "MODEL_CARD.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
