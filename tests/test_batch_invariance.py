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
from fastdiff import batch_invariance
from fastdiff.models import AutoencoderKL, DCGANGenerator, UNet

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


def _sample(out):
    return getattr(out, "sample", out)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("factory", [_unet_cond, _decoder, _dcgan], ids=["unet_cond", "vae_decoder", "dcgan"])
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
