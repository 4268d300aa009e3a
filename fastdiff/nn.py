"""Thin nn.Modules over fastdiff.ops: what models are built from.

Parameter names follow torch.nn (``weight``/``bias``) and the common attention layout (``to_q``, ``to_k``,
``to_v``, ``to_out``), so state dicts map one to one onto other implementations.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from fastdiff import ops

__all__ = ["GroupNormSiLU", "GroupNorm", "Conv2d", "Attention", "VectorQuantizer"]


class GroupNormSiLU(nn.Module):
    """GroupNorm followed by SiLU (or plain GroupNorm with ``activation=None``), one fused op.

    Input (N, C, *spatial) → output of the same shape, dtype and memory format.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 activation: Optional[str] = "silu"):
        super().__init__()
        if num_channels % num_groups != 0:
            raise ValueError(f"num_groups={num_groups} must divide num_channels={num_channels}")
        self.num_groups, self.num_channels, self.eps, self.activation = num_groups, num_channels, eps, activation
        self.weight = nn.Parameter(torch.ones(num_channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_channels)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        return ops.group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps, activation=self.activation)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, activation={self.activation}"


class GroupNorm(GroupNormSiLU):
    """Plain GroupNorm (no activation) through the same fused op: :class:`GroupNormSiLU` with ``activation=None``.

    Input (N, C, *spatial) → output of the same shape, dtype and memory format. Parameters ``weight`` / ``bias``
    (C,), as torch.nn.GroupNorm's.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__(num_groups, num_channels, eps, affine, activation=None)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}"


class Conv2d(nn.Conv2d):
    """torch.nn.Conv2d (same arguments, parameters and state dict) whose 3×3, stride-1, padding-1 case runs
    :func:`fastdiff.ops.conv3x3` (Winograd on the CPU); every other configuration is torch.nn.Conv2d's own forward.

    Input (N, C_in, H, W) → (N, C_out, H', W').
    """

    def forward(self, x: Tensor) -> Tensor:
        if (self.kernel_size == (3, 3) and self.stride == (1, 1) and self.padding == (1, 1)
                and self.dilation == (1, 1) and self.groups == 1 and self.padding_mode == "zeros" and x.ndim == 4
                and x.dtype == self.weight.dtype and not _autocast_on(x.device.type)):
            return ops.conv3x3(x, self.weight, self.bias)
        return super().forward(x)  # autocast picks the dtypes; mismatched dtypes get torch's own error


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch before 2.4: no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


class Attention(nn.Module):
    """Multi-head attention over token sequences: self (context=None) or cross (to a context sequence).

    forward(x (B, N, query_dim), context (B, M, context_dim) or None) → (B, N, query_dim).

    An attached IP-Adapter (:meth:`fastdiff.models.IPAdapter.attach`) sets ``_ip`` on a cross-attention module: a
    callable that adds its decoupled image branch to the attention output (per head, before ``to_out``).
    """

    _ip = None  # an IP-Adapter's hook (not a submodule: the module's parameters stay its own), or None

    def __init__(self, query_dim: int, context_dim: Optional[int] = None, heads: int = 8, dim_head: int = 64,
                 qkv_bias: bool = False, out_bias: bool = True):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, query_dim, bias=out_bias)

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        context = x if context is None else context
        b, n, _ = x.shape
        m = context.shape[1]
        q = self.to_q(x).view(b, n, self.heads, self.dim_head).transpose(1, 2)  # (B, H, N, D)
        k = self.to_k(context).view(b, m, self.heads, self.dim_head).transpose(1, 2)  # (B, H, M, D)
        v = self.to_v(context).view(b, m, self.heads, self.dim_head).transpose(1, 2)  # (B, H, M, D)
        out = ops.attention(q, k, v)  # (B, H, N, D)
        if self._ip is not None:
            out = self._ip(q, out)  # + scale · attention(q, k_ip, v_ip) of the image tokens
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head))


class VectorQuantizer(nn.Module):
    """Vector quantisation (VQ-VAE, van den Oord et al. 2017): every latent vector snaps to its nearest code.

    forward(z_e (B, C, H, W), C = embedding_dim) → (z_q, indices, loss):
      - indices (B, H, W) int64 from :func:`fastdiff.ops.vq_nearest` (the native search where built);
      - z_q (B, C, H, W), z_e's dtype, through the straight-through estimator z_e + (e[indices] − z_e).detach(), so
        the decoder's gradient reaches the encoder unchanged;
      - loss (scalar) = ‖sg[z_e] − e‖² (codebook) + beta · ‖z_e − sg[e]‖² (commitment), each a mean over elements.
        With ``ema=True`` the codebook learns no gradient: in training mode every forward moves it towards the mean
        of the vectors assigned to each code (exponential moving averages with ``decay``, Laplace-smoothed cluster
        sizes), the codebook term is zero and loss = beta · commitment.
    lookup(indices (B, H, W) integer) → z_q (B, C, H, W) for decoding.

    The codebook is ``self.embedding.weight`` (K, C), an nn.Embedding as in most VQ-VAE code, so checkpoints map
    one to one; with EMA the buffers ``cluster_size`` (K,) and ``embed_avg`` (K, C) hold the running statistics
    (codebook = embed_avg / smoothed cluster_size; a codebook set by hand sets ``embed_avg`` to it as well, the
    counts start at 1). Raises ValueError/TypeError (naming the argument) for bad sizes or inputs.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, beta: float = 0.25, ema: bool = False,
                 decay: float = 0.99, eps: float = 1e-5):
        super().__init__()
        for name, value in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta!r}")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.beta, self.ema, self.decay, self.eps = float(beta), bool(ema), float(decay), float(eps)
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_embeddings, 1.0 / num_embeddings)
        if self.ema:
            self.embedding.weight.requires_grad_(False)
            # One pseudo-count per code: a code nobody picks decays numerator and denominator alike, keeps its vector.
            self.register_buffer("cluster_size", torch.ones(num_embeddings))
            self.register_buffer("embed_avg", self.embedding.weight.detach().clone())

    def forward(self, z_e: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if not isinstance(z_e, Tensor) or not z_e.is_floating_point():
            raise TypeError(f"z_e must be a floating-point tensor, got {getattr(z_e, 'dtype', type(z_e).__name__)}")
        if z_e.ndim != 4 or z_e.shape[1] != self.embedding_dim:
            raise ValueError(f"z_e must have shape (B, {self.embedding_dim}, H, W), got {tuple(z_e.shape)}")
        b, c, h, w = z_e.shape
        weight = self.embedding.weight  # (K, C)
        flat = z_e.detach().permute(0, 2, 3, 1).reshape(-1, c).to(weight.dtype)  # (B·H·W, C)
        indices = ops.vq_nearest(flat, weight.detach())  # (B·H·W,)
        z_q = nn.functional.embedding(indices, weight).view(b, h, w, c).permute(0, 3, 1, 2).to(z_e.dtype)
        commitment = nn.functional.mse_loss(z_e, z_q.detach())
        if self.ema:
            if self.training:
                self._ema_update(flat, indices)
            loss = self.beta * commitment
        else:
            loss = nn.functional.mse_loss(z_q, z_e.detach()) + self.beta * commitment
        z_q = z_e + (z_q - z_e).detach()  # straight-through: forward is z_q, backward is the identity to z_e
        return z_q, indices.view(b, h, w), loss

    @torch.no_grad()
    def _ema_update(self, flat: Tensor, indices: Tensor) -> None:
        """codebook_k ← EMA(sum of vectors assigned to k) / EMA(count of k), counts Laplace-smoothed."""
        k = self.num_embeddings
        counts = torch.bincount(indices, minlength=k).to(self.cluster_size.dtype)  # (K,)
        sums = torch.zeros_like(self.embed_avg).index_add_(0, indices, flat.to(self.embed_avg.dtype))  # (K, C)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.embed_avg.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + k * self.eps) * total  # (K,)
        self.embedding.weight.copy_(self.embed_avg / smoothed.unsqueeze(1))

    def lookup(self, indices: Tensor) -> Tensor:
        """Code indices (B, H, W), any integer dtype → codebook vectors z_q (B, C, H, W) (the codebook's dtype)."""
        if not isinstance(indices, Tensor) or indices.ndim != 3 or indices.is_floating_point() or indices.is_complex():
            shape = tuple(indices.shape) if isinstance(indices, Tensor) else type(indices).__name__
            raise ValueError(f"indices must be an integer tensor of shape (B, H, W), got {shape}")
        z_q = nn.functional.embedding(indices.long(), self.embedding.weight)  # (B, H, W, C)
        return z_q.permute(0, 3, 1, 2).contiguous()

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, beta={self.beta}, ema={self.ema}"
                + (f", decay={self.decay}" if self.ema else ""))
