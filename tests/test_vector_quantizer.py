"""fastdiff.nn.VectorQuantizer: nearest codes, the straight-through gradient, the losses, EMA updates, lookup."""

from __future__ import annotations

import pytest
import torch

import fastdiff
from fastdiff import native
from fastdiff.nn import VectorQuantizer

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.fixture(autouse=True)
def _native_path(monkeypatch):
    """These tests run the module as users do: FASTDIFF_BACKEND=auto, so the native search (the suite's default is
    the reference path)."""
    monkeypatch.setenv("FASTDIFF_BACKEND", "auto")
    assert native.load(), native.status()


def brute_force_indices(z_e: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    flat = z_e.detach().permute(0, 2, 3, 1).reshape(-1, z_e.shape[1]).double()
    return torch.cdist(flat, codebook.detach().double()).argmin(1).view(z_e.shape[0], *z_e.shape[2:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 8, 5, 7), (1, 3, 1, 1), (3, 16, 4, 4)], ids=["odd", "1x1", "square"])
def test_forward_nearest_codes(shape, device):
    b, c, h, w = shape
    vq = VectorQuantizer(64, c).to(device)
    vq.embedding.weight.data.normal_()
    z_e = torch.randn(shape, device=device)
    fastdiff.reset_counts()
    z_q, indices, loss = vq(z_e)
    assert fastdiff.counts().get(("vq_nearest", "native"), 0) == 1, fastdiff.counts()
    assert z_q.shape == shape and z_q.dtype == z_e.dtype
    assert indices.shape == (b, h, w) and indices.dtype == torch.int64
    assert torch.equal(indices.cpu(), brute_force_indices(z_e, vq.embedding.weight).cpu())
    expected = vq.embedding.weight[indices].permute(0, 3, 1, 2)
    torch.testing.assert_close(z_q, expected)  # the straight-through output equals the codes (up to rounding)
    torch.testing.assert_close(vq.lookup(indices), expected, rtol=0, atol=0)
    mse = ((expected - z_e) ** 2).mean()
    torch.testing.assert_close(loss, (1 + vq.beta) * mse)
    assert loss.ndim == 0


def test_channels_last_and_non_contiguous():
    vq = VectorQuantizer(32, 6)
    vq.embedding.weight.data.normal_()
    z_e = torch.randn(2, 6, 9, 5)
    ref = vq(z_e)[1]
    assert torch.equal(vq(z_e.to(memory_format=torch.channels_last))[1], ref)
    wide = torch.randn(2, 6, 9, 10)
    strided = wide[..., ::2]
    assert torch.equal(vq(strided)[1], vq(strided.contiguous())[1])


def test_gradient_reaches_encoder():
    """The straight-through estimator passes the decoder's gradient to the encoder; the losses train both sides."""
    torch.manual_seed(0)
    encoder = torch.nn.Conv2d(3, 8, 1)
    decoder = torch.nn.Conv2d(8, 3, 1)
    vq = VectorQuantizer(16, 8)
    x = torch.randn(4, 3, 6, 6)
    z_e = encoder(x)
    z_q, _, vq_loss = vq(z_e)
    recon = decoder(z_q)
    ((recon - x) ** 2).mean().backward(retain_graph=True)
    assert encoder.weight.grad is not None and encoder.weight.grad.abs().sum() > 0
    assert vq.embedding.weight.grad is None  # the reconstruction term does not train the codebook
    # Straight-through is the identity: d recon_loss / d z_e equals d recon_loss / d z_q.
    z_e2 = z_e.detach().requires_grad_(True)
    z_q2, _, _ = vq(z_e2)
    z_q2.retain_grad()
    ((decoder(z_q2) - x) ** 2).mean().backward()
    torch.testing.assert_close(z_e2.grad, z_q2.grad)
    # The VQ loss trains the codebook (codebook term) and the encoder (commitment term).
    encoder.zero_grad()
    vq_loss.backward()
    assert vq.embedding.weight.grad is not None and vq.embedding.weight.grad.abs().sum() > 0
    assert encoder.weight.grad.abs().sum() > 0


def test_ema_updates_codebook_in_training_only():
    torch.manual_seed(0)
    centres = torch.tensor([[4.0, 0.0], [-4.0, 0.0], [0.0, 4.0]])
    vq = VectorQuantizer(3, 2, beta=0.5, ema=True, decay=0.8)
    vq.embedding.weight.data.copy_(centres * 0.5)  # each centre's nearest code is its own
    vq.embed_avg.copy_(vq.embedding.weight)
    assert not vq.embedding.weight.requires_grad
    for _ in range(60):
        labels = torch.randint(0, 3, (256,))
        points = centres[labels] + 0.1 * torch.randn(256, 2)
        z_e = points.t().reshape(1, 2, 16, 16)  # (B, C, H, W)
        z_q, _, loss = vq(z_e)
    torch.testing.assert_close(vq.embedding.weight, centres, atol=0.05, rtol=0)
    torch.testing.assert_close(loss, 0.5 * ((z_q - z_e) ** 2).mean())  # beta · commitment only
    assert set(vq.state_dict()) == {"embedding.weight", "cluster_size", "embed_avg"}
    before = vq.embedding.weight.clone()
    vq.eval()
    vq(torch.randn(1, 2, 8, 8) * 10)
    assert torch.equal(vq.embedding.weight, before)


def test_ema_keeps_unused_codes():
    """A code nobody picks keeps its vector while its pseudo-count decays (no division by a vanishing count)."""
    vq = VectorQuantizer(4, 2, ema=True, decay=0.9)
    vq.embedding.weight.data.copy_(torch.tensor([[0.0, 0.0], [100.0, 100.0], [-100.0, 100.0], [1.0, 1.0]]))
    vq.embed_avg.copy_(vq.embedding.weight)  # a hand-set codebook sets the running sum too (cluster_size is 1)
    for _ in range(20):
        vq(0.1 * torch.randn(1, 2, 4, 4))
    assert torch.isfinite(vq.embedding.weight).all()
    torch.testing.assert_close(vq.embedding.weight[1:3], torch.tensor([[100.0, 100.0], [-100.0, 100.0]]), rtol=1e-3,
                               atol=0)


def test_low_precision_latents():
    vq = VectorQuantizer(32, 4)
    vq.embedding.weight.data.normal_()
    z_e = torch.randn(2, 4, 3, 3).bfloat16()
    z_q, indices, loss = vq(z_e)
    assert z_q.dtype == torch.bfloat16 and torch.isfinite(loss)
    assert torch.equal(indices, brute_force_indices(z_e.float(), vq.embedding.weight))


def test_checkpoint_layout_and_lookup():
    vq = VectorQuantizer(10, 3)
    assert set(vq.state_dict()) == {"embedding.weight"}
    assert isinstance(vq.embedding, torch.nn.Embedding) and vq.embedding.weight.shape == (10, 3)
    idx = torch.tensor([[[0, 9], [3, 3]]], dtype=torch.int32)
    out = vq.lookup(idx)
    assert out.shape == (1, 3, 2, 2) and out.is_contiguous()
    torch.testing.assert_close(out[0, :, 1, 0], vq.embedding.weight[3])


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"num_embeddings": 0, "embedding_dim": 3}, ValueError, "num_embeddings"),
    ({"num_embeddings": 4, "embedding_dim": 2.5}, ValueError, "embedding_dim"),
    ({"num_embeddings": 4, "embedding_dim": 3, "beta": -1}, ValueError, "beta"),
    ({"num_embeddings": 4, "embedding_dim": 3, "ema": True, "decay": 1.0}, ValueError, "decay"),
])
def test_bad_construction(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        VectorQuantizer(**kwargs)


def test_bad_forward_and_lookup():
    vq = VectorQuantizer(8, 3)
    with pytest.raises(ValueError, match=r"z_e must have shape \(B, 3, H, W\)"):
        vq(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match="z_e must have shape"):
        vq(torch.randn(2, 3, 5))
    with pytest.raises(TypeError, match="z_e must be a floating-point tensor"):
        vq(torch.ones(2, 3, 5, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="indices must be an integer tensor"):
        vq.lookup(torch.zeros(2, 5, 5))
    with pytest.raises(ValueError, match="indices must be an integer tensor"):
        vq.lookup(torch.zeros(2, 5, dtype=torch.int64))
