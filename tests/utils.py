"""Comparison helpers shared by the tests: relative error with a verbose report, and output poisoning."""

from __future__ import annotations

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN or Inf anywhere in out gives inf (NaN never passes)."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    return (out64 - ref64).norm().item() / max(denom, 1e-30)


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "output") -> None:
    """Fail with the relative error, the first bad index and the values there, not a bare allclose."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    err = rel_err(out, ref)
    if not err <= tol:
        o, r = out.detach().double().cpu(), ref.detach().double().cpu()
        diff = (o - r).abs()
        diff[~torch.isfinite(o)] = float("inf")
        flat = int(diff.flatten().argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), o.shape))
        n_bad = int((diff > tol * (r.abs() + 1e-6)).sum())
        raise AssertionError(
            f"{what}: relative error {err:.3e} > {tol:.1e}; worst at index {idx}: got {o[idx].item():.6g}, "
            f"expected {r[idx].item():.6g}; {n_bad}/{o.numel()} elements off; non-finite: {int((~torch.isfinite(o)).sum())}"
        )


def poison_empty(monkeypatch) -> None:
    """Make torch.empty / empty_like / empty_strided / new_empty return NaN-filled (or min-int) tensors.

    Kernels allocate their outputs with these; poisoning them makes any element a kernel forgets to write fail.
    """
    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(torch.iinfo(t.dtype).min)
        return t

    real_empty, real_empty_like, real_strided = torch.empty, torch.empty_like, torch.empty_strided
    real_new_empty = torch.Tensor.new_empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))
    monkeypatch.setattr(torch, "empty_strided", lambda *a, **k: fill(real_strided(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: fill(real_new_empty(self, *a, **k)))


def cap_cpu_isa(monkeypatch, isa: str) -> str:
    """Cap the native micro-kernels at ``isa`` for one test (FASTDIFF_CPU_ISA); "as_set" leaves the variable as the
    environment has it (unset: this CPU's best level; the ISA matrix runs the "as_set" tests under each cap)."""
    if isa != "as_set":
        monkeypatch.setenv("FASTDIFF_CPU_ISA", isa)
    return isa
