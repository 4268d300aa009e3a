"""fastdiff.batch_invariant: every row of a batched forward pass has the same bits whatever the batch size, and the
mode computes the same function as plain PyTorch (up to float32 rounding).

The models are small random ones; the batch sizes include 1 and 2 (where oneDNN/BLAS switch kernels on CPU) and
sizes that are not multiples of the convolution chunk.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastdiff
from fastdiff import batch_invariance, native
from fastdiff.models import AutoencoderKL, DCGANGenerator, StyleGenerator, UNet

TOTAL = 21
SIZES = (1, 2, 3, 5, 16, 17)  # sub-batches compared against the full batch of TOTAL rows


def _unet_cond():
    model = UNet(in_channels=4, out_channels=4, base_channels=16, channel_mult=(1, 2), layers_per_block=1,
                 attention_levels=(0, 1), norm_num_groups=4, num_attention_heads=2, num_classes=10, context_dim=12)
    inputs = (torch.randn(TOTAL, 4, 8, 8), torch.randint(0, 1000, (TOTAL,)))
    kwargs = {"class_labels": torch.randint(0, 10, (TOTAL,)), "context": torch.randn(TOTAL, 7, 12)}
    return model, (lambda s: model(inputs[0][s], inputs[1][s], **{k: v[s] for k, v in kwargs.items()}))


def _decoder():
    model = AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=4)
    z = torch.randn(TOTAL, 4, 8, 8)
    return model, (lambda s: model.decode(z[s]))


def _dcgan():
    model = DCGANGenerator(resolution=16, latent_dim=32, channels=1, width=16)
    z = torch.randn(TOTAL, 32)
    return model, (lambda s: model(z[s]))


def _style():
    model = StyleGenerator(resolution=8, latent_dim=8, w_dim=8, mapping_layers=2, base_channels=8, max_channels=8,
                           channels=1)
    z = torch.randn(TOTAL, 8)
    noise = model.make_noise(TOTAL)
    return model, (lambda s: model(z[s], noise=[n[s] for n in noise]))


def _sample(out):
    return getattr(out, "sample", out)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("factory", [_unet_cond, _decoder, _dcgan, _style],
                         ids=["unet_cond", "vae_decoder", "dcgan", "style"])
def test_rows_do_not_depend_on_the_batch(factory, threads):
    torch.manual_seed(0)
    model, call = factory()
    model.eval()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            plain = _sample(call(slice(0, TOTAL)))
            with fastdiff.batch_invariant():
                full = _sample(call(slice(0, TOTAL)))
                for n in SIZES:
                    for start in (0, TOTAL - n):
                        part = _sample(call(slice(start, start + n)))
                        assert torch.equal(part, full[start:start + n]), (
                            f"rows {start}..{start + n - 1}: max diff {(part - full[start:start + n]).abs().max()}")
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(full, plain, rtol=1e-5, atol=1e-5)  # the same function


@pytest.mark.parametrize("threads", [1, 2])
def test_a_batch_of_one_gets_the_gemm_of_any_other_batch(threads):
    """The planted case of the first failure: (7 tokens × 12) @ (12 × 32) per row. Outside the mode a batch of 1 is one
    BLAS GEMM (threaded when torch has 2 threads) and a larger batch a batched GEMM (one single-threaded GEMM per
    row); MKL's threaded small GEMM sums in another order on some CPUs. Inside the mode fastdiff's own GEMM computes
    each element as one FMA chain, whatever the rows around it."""
    if not native.has_rows_matmul():
        pytest.skip(f"native extension: {native.status()}")
    torch.manual_seed(3)
    x, w, b = torch.randn(TOTAL, 7, 12), torch.randn(32, 12), torch.randn(32)
    y, z = torch.randn(TOTAL, 7, 32), torch.randn(TOTAL, 32, 5)
    ops = {
        "linear": lambda s: F.linear(x[s], w, b),
        "matmul": lambda s: x[s] @ w.t(),
        "mm": lambda s: torch.mm(x[s][:, 0], w.t()),
        "bmm": lambda s: torch.bmm(y[s], z[s]),
    }
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with fastdiff.batch_invariant():
            for name, op in ops.items():
                full = op(slice(0, TOTAL))
                for n in (1, 2, 3, batch_invariance.CHUNK + 1):
                    for start in (0, TOTAL - n):
                        assert torch.equal(op(slice(start, start + n)), full[start:start + n]), (name, start, n)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("path", ["native", "fallback"])
def test_matmuls_match_plain_torch(path, monkeypatch):
    if path == "fallback":  # BLAS in fixed-shape chunks: without the extension, other dtypes, or autograd
        monkeypatch.setattr(native, "has_rows_matmul", lambda: False)
    elif not native.has_rows_matmul():
        pytest.skip(f"native extension: {native.status()}")
    torch.manual_seed(4)
    a, w, v = torch.randn(5, 3, 9), torch.randn(9, 4), torch.randn(9)
    p, q = torch.randn(19, 6, 7), torch.randn(19, 7, 2)
    with fastdiff.batch_invariant():
        got = [a @ w, torch.matmul(a, w), a.matmul(w), torch.mm(a[0], w), a[0].mm(w), torch.bmm(p, q), p.bmm(q),
               a @ v, torch.matmul(w.t(), a[0].t())]
        empty = torch.mm(a[0][:0], w)
    want = [a @ w, a @ w, a @ w, a[0] @ w, a[0] @ w, p @ q, p @ q, a @ v, w.t() @ a[0].t()]
    for g, e in zip(got, want):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert empty.shape == (0, 4)


def test_linear_and_convolutions_match_plain_torch():
    torch.manual_seed(1)
    w, b = torch.randn(24, 40), torch.randn(24)
    with fastdiff.batch_invariant():
        for x in (torch.randn(5, 40), torch.randn(5, 9, 40), torch.randn(3, 2, 4, 40)):
            torch.testing.assert_close(F.linear(x, w, b), x @ w.t() + b, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(F.linear(x, w), x @ w.t(), rtol=1e-5, atol=1e-4)
        v = torch.randn(40)  # 1-D: no batch, plain F.linear
        torch.testing.assert_close(F.linear(v, w, b), w @ v + b, rtol=1e-5, atol=1e-4)
        x = torch.randn(batch_invariance.CHUNK * 2 + 3, 6, 9, 9)
        cw, tw = torch.randn(8, 6, 3, 3), torch.randn(6, 8, 4, 4)
        got = F.conv2d(x, cw, stride=2, padding=1)
        got_t = F.conv_transpose2d(x, tw, stride=2, padding=1)
        empty = F.conv2d(x[:0], cw, padding=1)
    torch.testing.assert_close(got, F.conv2d(x, cw, stride=2, padding=1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got_t, F.conv_transpose2d(x, tw, stride=2, padding=1), rtol=1e-5, atol=1e-4)
    assert got.shape == (x.shape[0], 8, 5, 5) and got_t.shape == (x.shape[0], 8, 18, 18)
    assert empty.shape == (0, 8, 9, 9)


def test_gradients_flow_and_the_mode_is_scoped(monkeypatch):
    torch.manual_seed(2)
    lin = torch.nn.Linear(6, 3)
    x = torch.randn(4, 6, requires_grad=True)
    with fastdiff.batch_invariant():
        lin(x).square().sum().backward()
    grad = x.grad.clone()
    x.grad = None
    lin.zero_grad()
    lin(x).square().sum().backward()
    torch.testing.assert_close(grad, x.grad, rtol=1e-5, atol=1e-5)

    seen = []

    def spy(*args, **kwargs):
        seen.append(1)
        return F.linear(*args, **kwargs)

    monkeypatch.setattr(batch_invariance, "_linear", spy)
    with fastdiff.batch_invariant(enabled=False):
        lin(x)
    assert not seen  # enabled=False is a no-op
    with fastdiff.batch_invariant():
        lin(x)
    assert len(seen) == 1
    lin(x)  # outside the block: plain torch again
    assert len(seen) == 1
