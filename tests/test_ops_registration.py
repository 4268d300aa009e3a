"""The ops as torch.library custom ops (opcheck, torch.compile), the dispatch rule, and fastdiff.info()."""

import logging
import subprocess
import sys

import pytest
import torch

import fastdiff
from fastdiff import dispatch, ops, reference
from tests.utils import assert_rel_close


def _op_cases(backend):
    x = torch.randn(2, 8, 5, 3)
    w, b = torch.randn(8), torch.randn(8)
    q, k = torch.randn(1, 2, 9, 32), torch.randn(1, 2, 77, 32)
    s, eps, eps2 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(4, 3, 4, 4)
    a_t = torch.tensor([0.3, 0.5])
    return [
        (torch.ops.fastdiff.group_norm_silu.default, (x, 4, w, b, 1e-5, "silu", backend)),
        (torch.ops.fastdiff.group_norm_silu.default, (x.to(memory_format=torch.channels_last), 2, None, None, 1e-5,
                                                      "none", backend)),
        (torch.ops.fastdiff.attention.default, (q, k, k.clone(), 32**-0.5, backend)),
        (torch.ops.fastdiff.ddim_step.default, (s, eps, None, None, 0.3, 0.6, 0.5, torch.randn_like(s), "epsilon",
                                                1.0, None, False, backend)),
        (torch.ops.fastdiff.ddim_step.default, (s, eps2, a_t, None, 0.0, 0.6, 0.0, None, "v_prediction", None, 3.0,
                                                False, backend)),
        (torch.ops.fastdiff.ddpm_step.default, (s, eps, a_t, a_t + 0.1, 0.0, 0.0, torch.randn_like(s), "fixed_small",
                                                "sample", None, None, backend)),
        (torch.ops.fastdiff.linear_step.default, (s, eps, [s.clone()], [0.5, -1.0, 0.0, 1.0, 0.2, 0.3, 0.4], 2, None,
                                                  1.0, backend)),
        (torch.ops.fastdiff.linear_step.default, (s, eps2, [], [0.5, -1.0], 1, 3.0, None, backend)),
    ]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend):
    """Schema, fake implementation and faketensor/aot dispatch of every Triton-family op."""
    for op, args in _op_cases(backend):
        torch.library.opcheck(op, args)


def test_compile_fullgraph_sees_one_op():
    """torch.compile(fullgraph=True) traces a block of fastdiff ops without graph breaks and matches eager."""
    torch._dynamo.reset()

    def block(x, w, b, q, k):
        h = ops.group_norm_silu(x, 4, w, b)
        a = ops.attention(q, k, k)
        prev, x0 = ops.ddim_step(h, h * 0.5, 0.4, 0.7)
        return prev, x0, a

    args = (torch.randn(2, 8, 4, 4), torch.randn(8), torch.randn(8), torch.randn(1, 2, 16, 32),
            torch.randn(1, 2, 7, 32))
    eager = block(*args)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(*args)
    for e, c in zip(eager, compiled):
        assert_rel_close(c, e, 1e-6, "compiled vs eager")


def test_backend_argument_and_env(monkeypatch):
    x = torch.randn(2, 8, 3, 3)
    dispatch.reset_counts()
    ops.group_norm_silu(x, 4, backend="torch")
    assert fastdiff.counts() == {("group_norm_silu", "torch"): 1}
    ops.group_norm_silu(x, 4, backend="triton")  # TRITON_INTERPRET=1 is set by conftest
    assert fastdiff.counts()[("group_norm_silu", "interpreter")] == 1
    monkeypatch.setenv("FASTDIFF_BACKEND", "auto")
    ops.group_norm_silu(x, 4)
    assert fastdiff.counts()[("group_norm_silu", "interpreter")] == 2
    monkeypatch.setenv("FASTDIFF_BACKEND", "torch")
    ops.group_norm_silu(x, 4)
    assert fastdiff.counts()[("group_norm_silu", "torch")] == 2
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("FASTDIFF_BACKEND", "auto")
    assert dispatch.select("attention", torch.device("cpu")) == "torch"  # plain CPU → reference
    with pytest.raises(RuntimeError, match="Triton cannot run here"):
        ops.attention(torch.randn(1, 1, 4, 32), torch.randn(1, 1, 4, 32), torch.randn(1, 1, 4, 32), backend="triton")
    monkeypatch.setenv("FASTDIFF_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTDIFF_BACKEND"):
        ops.group_norm_silu(x, 4)
    with pytest.raises(ValueError, match="backend"):
        ops.group_norm_silu(x, 4, backend="cuda")


def test_autograd_takes_the_reference_and_is_differentiable(monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "auto")
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    dispatch.reset_counts()
    y = ops.group_norm_silu(x, 4)
    y.square().sum().backward()
    assert fastdiff.counts() == {("group_norm_silu", "torch"): 1}
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    q = torch.randn(1, 2, 5, 32, requires_grad=True)
    ops.attention(q, q, q).sum().backward()
    assert q.grad is not None and fastdiff.counts()[("attention", "torch")] == 1


def test_missing_triton_falls_back_with_one_log_line(monkeypatch, caplog):
    monkeypatch.setattr(dispatch, "_triton_checked", False)
    monkeypatch.setattr(dispatch, "_triton_error", "ImportError: no triton")
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.setenv("FASTDIFF_BACKEND", "auto")
    cuda = torch.device("cuda")
    with caplog.at_level(logging.WARNING, logger="fastdiff"):
        assert dispatch.select("attention", cuda) == "torch"
        assert dispatch.select("group_norm_silu", cuda) == "torch"
    assert sum("Triton is not available" in r.message for r in caplog.records) == 1
    assert dispatch.select("attention", torch.device("cpu")) == "torch"  # even with TRITON_INTERPRET=1


def test_import_without_triton():
    """`import fastdiff` and the reference ops work when triton cannot be imported."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, fastdiff\n"
        "from fastdiff import ops\n"
        "y = ops.group_norm_silu(torch.randn(1, 4, 2, 2), 2)\n"
        "info = fastdiff.info()\n"
        "assert info['triton'] is None, info\n"
        "assert set(info['ops'].values()) <= {'torch', 'native'}, info\n"
        "print('ok')\n"
    )
    env = {"PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "1", "FASTDIFF_BACKEND": "auto"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_info_reports_every_op():
    info = fastdiff.info()
    assert set(info["ops"]) == {"group_norm_silu", "attention", "ddim_step", "ddpm_step", "linear_step", "vq_nearest",
                                "conv3x3"}
    assert info["torch"] == torch.__version__
    assert info["ops"]["attention"] in ("torch", "interpreter", "triton")


def test_reference_paths_agree_with_public_ops():
    """The public ops on the reference backend are exactly the reference functions (no hidden maths in ops.py)."""
    x = torch.randn(3, 6, 5)
    assert torch.equal(ops.group_norm_silu(x, 3, backend="torch"), reference.group_norm_silu(x, 3))
    q, k = torch.randn(2, 1, 4, 8), torch.randn(2, 1, 6, 8)
    assert torch.equal(ops.attention(q, k, k, backend="torch"), reference.attention(q, k, k, 8**-0.5))
