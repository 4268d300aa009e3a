"""Thin nn.Modules over fastdiff.ops: what models are built from.

Parameter names follow torch.nn (``weight``/``bias``) and the common attention layout (``to_q``, ``to_k``,
``to_v``, ``to_out``), so state dicts map one to one onto other implementations.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from fastdiff import ops

__all__ = ["GroupNormSiLU", "Attention"]


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


class Attention(nn.Module):
    """Multi-head attention over token sequences: self (context=None) or cross (to a context sequence).

    forward(x (B, N, query_dim), context (B, M, context_dim) or None) → (B, N, query_dim).
    """

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
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head))
