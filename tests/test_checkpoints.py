"""save_pretrained / from_pretrained / fastdiff.load_model: bit-exact round trips and clear errors on bad files."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from model_factories import CASES, HAS_VQ, build, case_params, make_inputs, needs_vq, run
from safetensors.torch import load_file, save_file
from utils import assert_rel_close

import fastdiff
from fastdiff.models import VAE, VQVAE, AutoencoderKL, DCGANGenerator, UNet, registered_models
from fastdiff.models.modeling import CONFIG_NAME, WEIGHTS_NAME


def _outputs(model, name):
    with torch.no_grad():
        return run(model, make_inputs(name, model, seed=5))


@pytest.mark.parametrize("name", case_params())
def test_round_trip_bit_exact(name, tmp_path):
    model = build(name).eval()
    if name == "style_generator":  # make the tracked w_avg non-trivial so the buffer round trip means something
        model.train()(torch.randn(4, model.config.latent_dim))
        model.eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["_class_name"] == type(model).__name__
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())

    for loaded in (type(model).from_pretrained(tmp_path), fastdiff.load_model(tmp_path)):
        assert type(loaded) is type(model) and loaded.config == model.config and not loaded.training
        ref_state, state = model.state_dict(), loaded.state_dict()
        assert list(state) == list(ref_state)
        for key, ref in ref_state.items():
            assert state[key].dtype == ref.dtype and torch.equal(state[key], ref), f"{name}: {key} changed"
        for out, ref in zip(_outputs(loaded, name), _outputs(model, name)):
            assert torch.equal(out, ref), f"{name}: outputs differ after the round trip"


def test_registry_knows_every_model():
    assert {type(build(n)).__name__ for n in CASES if n != "vqvae"} <= set(registered_models())
    assert "VQVAE" in registered_models()


def test_dtype_and_device(tmp_path):
    torch.manual_seed(0)
    model = VAE(input_dim=6, hidden_dim=4, latent_dim=2)
    model.save_pretrained(tmp_path / "fp32")
    half = VAE.from_pretrained(tmp_path / "fp32", device="cpu", dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in half.parameters())
    assert torch.equal(half.fc1.weight, model.fc1.weight.half())
    half.save_pretrained(tmp_path / "fp16")
    again = fastdiff.load_model(tmp_path / "fp16")  # dtype=None keeps the stored dtype
    assert all(p.dtype == torch.float16 for p in again.parameters())
    assert torch.equal(again.fc1.weight, half.fc1.weight)
    with pytest.raises(TypeError, match="dtype"):
        VAE.from_pretrained(tmp_path / "fp32", dtype=torch.int32)


@needs_vq
def test_vqvae_ema_buffers_round_trip(tmp_path):
    torch.manual_seed(0)
    model = VQVAE(block_out_channels=(8,), latent_channels=2, norm_num_groups=4, num_embeddings=8, ema=True,
                  mid_attention=False).train()
    model(torch.randn(2, 3, 4, 4))  # one EMA update of the codebook statistics
    model.eval().save_pretrained(tmp_path)
    loaded = fastdiff.load_model(tmp_path)
    for key in ("quantize.cluster_size", "quantize.embed_avg", "quantize.embedding.weight"):
        assert torch.equal(loaded.state_dict()[key], model.state_dict()[key]), key
    x = torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), model.encode(x))


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = UNet(base_channels=8, channel_mult=(1, 2), layers_per_block=1, attention_levels=(1,), norm_num_groups=4)
    model.save_pretrained(tmp_path)
    return tmp_path


def _rewrite_weights(folder, edit):
    tensors = load_file(str(folder / WEIGHTS_NAME))
    edit(tensors)
    save_file(tensors, str(folder / WEIGHTS_NAME))


def _rewrite_config(folder, edit):
    config = json.loads((folder / CONFIG_NAME).read_text())
    edit(config)
    (folder / CONFIG_NAME).write_text(json.dumps(config))


@pytest.fixture
def no_assignment(monkeypatch):
    """Fail the test if anything reaches load_state_dict: bad checkpoints must be rejected before assignment."""
    calls = []
    real = torch.nn.Module.load_state_dict
    monkeypatch.setattr(torch.nn.Module, "load_state_dict",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    yield calls
    assert not calls, "load_state_dict ran on an invalid checkpoint"


def test_missing_folder_and_files(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        UNet.from_pretrained(tmp_path / "nowhere")
    (saved / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        UNet.from_pretrained(saved)
    (saved / CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        fastdiff.load_model(saved)


def test_invalid_json(saved):
    (saved / CONFIG_NAME).write_text('{"_class_name": "UNet", ')
    with pytest.raises(ValueError, match=f"{CONFIG_NAME}.*not valid JSON"):
        UNet.from_pretrained(saved)
    (saved / CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        fastdiff.load_model(saved)


def test_truncated_safetensors(saved, no_assignment):
    data = (saved / WEIGHTS_NAME).read_bytes()
    (saved / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{WEIGHTS_NAME}.*safetensors"):
        UNet.from_pretrained(saved)
    (saved / WEIGHTS_NAME).write_bytes(b"\x00" * 4)
    with pytest.raises(ValueError, match=WEIGHTS_NAME):
        fastdiff.load_model(saved)


def test_missing_tensor(saved, no_assignment):
    _rewrite_weights(saved, lambda t: t.pop("mid_block.resnets.0.conv1.weight"))
    with pytest.raises(ValueError, match=r"missing tensor.*'mid_block\.resnets\.0\.conv1\.weight'"):
        UNet.from_pretrained(saved)


def test_unexpected_tensor(saved, no_assignment):
    _rewrite_weights(saved, lambda t: t.__setitem__("extra.weight", torch.zeros(3)))
    with pytest.raises(ValueError, match=r"unexpected tensor.*'extra\.weight'"):
        fastdiff.load_model(saved)


def test_shape_mismatch(saved, no_assignment):
    _rewrite_weights(saved, lambda t: t.__setitem__("conv_out.bias", torch.zeros(4)))
    with pytest.raises(ValueError, match=r"'conv_out\.bias' has shape \(4,\), the model expects \(3,\)"):
        UNet.from_pretrained(saved)


def test_config_and_weights_disagree(saved, no_assignment):
    _rewrite_config(saved, lambda c: c.__setitem__("out_channels", 4))
    with pytest.raises(ValueError, match=r"conv_out\.(weight|bias)"):
        UNet.from_pretrained(saved)


def test_dtype_kind_mismatch(saved, no_assignment):
    _rewrite_weights(saved, lambda t: t.__setitem__("conv_out.bias", torch.zeros(3, dtype=torch.int64)))
    with pytest.raises(ValueError, match=r"'conv_out\.bias' has dtype torch.int64"):
        UNet.from_pretrained(saved)


def test_wrong_class(saved):
    with pytest.raises(ValueError, match="holds a 'UNet', not a 'VAE'"):
        VAE.from_pretrained(saved)


def test_unknown_class_and_keys(saved):
    _rewrite_config(saved, lambda c: c.__setitem__("_class_name", "Transformer"))
    with pytest.raises(ValueError, match="unknown model class 'Transformer'.*UNet"):
        fastdiff.load_model(saved)
    _rewrite_config(saved, lambda c: c.pop("_class_name"))
    with pytest.raises(ValueError, match="_class_name"):
        fastdiff.load_model(saved)
    _rewrite_config(saved, lambda c: c.update(_class_name="UNet", sample_size=32))
    with pytest.raises(ValueError, match=f"{CONFIG_NAME}.*unknown UNetConfig key.*sample_size"):
        UNet.from_pretrained(saved)
    _rewrite_config(saved, lambda c: c.update(sample_size=None, norm_num_groups=3) or c.pop("sample_size"))
    with pytest.raises(ValueError, match=f"{CONFIG_NAME}.*invalid UNetConfig.*norm_num_groups"):
        UNet.from_pretrained(saved)


def test_save_into_a_file_path(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        VAE(input_dim=4, hidden_dim=2, latent_dim=1).save_pretrained(tmp_path / "file")


def test_numpy_config_values_save_and_load_back_as_python_types(tmp_path):
    """A config built from numpy scalars (np.int64(32) ...) stores plain Python values, so save_pretrained can write
    its JSON, and the checkpoint loads back equal, with int / float fields."""
    models = {
        "unet": UNet(block_out_channels=np.array([8, 16]), layers_per_block=np.int64(1), norm_num_groups=np.int64(4),
                     attention_levels=(np.int64(1),), norm_eps=np.float32(1e-5), num_classes=np.int64(3)),
        "dcgan": DCGANGenerator(resolution=np.int64(32), latent_dim=np.int64(8), width=np.int32(4)),
        "vae": VAE(input_dim=np.int64(6), hidden_dim=np.int64(4), latent_dim=np.int64(2)),
    }
    for name, model in models.items():
        model.save_pretrained(tmp_path / name)
        stored = json.loads((tmp_path / name / CONFIG_NAME).read_text())
        loaded = fastdiff.load_model(tmp_path / name)
        assert loaded.config == model.config
        for f in dataclasses.fields(loaded.config):
            value = getattr(loaded.config, f.name)
            assert type(value) is type(getattr(model.config, f.name)) and type(value) in (int, float, bool, str,
                                                                                          tuple, type(None)), f.name
        assert type(stored["norm_num_groups" if name == "unet" else "latent_dim"]) is int


@pytest.mark.parametrize("existing", [False, True])
def test_a_config_that_cannot_be_written_writes_nothing(tmp_path, existing):
    """The config JSON is made before any file is written: a config value JSON cannot hold (here set after
    construction, past the config's checks) fails with no new file, folder or temporary, and an old checkpoint in
    the folder is left as it was."""
    folder = tmp_path / "ckpt"
    model = VAE(input_dim=4, hidden_dim=2, latent_dim=1)
    if existing:
        model.save_pretrained(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()} if existing else None
    model.config.hidden_dim = np.int64(2)  # bypasses __post_init__
    with torch.no_grad():
        model.fc1.weight.add_(1.0)  # so new weights would differ from the old ones
    with pytest.raises(TypeError, match="VAEConfig cannot be written as JSON.*int64"):
        model.save_pretrained(folder)
    if existing:
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    else:
        assert not folder.exists()


# --------------------------------------------------------------------------------------------- diffusers names
def _diffusers_pairs():
    """(diffusers model, equivalent fastdiff model, inputs → (diffusers output, fastdiff output)) for tiny configs."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    x8, x16, ctx = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 16, 16), torch.randn(2, 5, 12)
    t, y = torch.tensor([10, 900]), torch.tensor([3, 10])
    pairs = [(
        diffusers.UNet2DModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                              down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                              up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, num_class_embeds=11),
        UNet(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, attention_levels=(1,),
             attention_head_dim=8, num_classes=10),
        lambda d, m: (d(x8, t, class_labels=y).sample, m(x8, t, y)),
    ), (
        diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
            norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12, attention_head_dim=2,
            use_linear_projection=True),
        UNet(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, attention_levels=(0,),
             num_attention_heads=2, context_dim=12, use_linear_projection=True),
        lambda d, m: (d(x8, t, encoder_hidden_states=ctx).sample, m(x8, t, context=ctx)),
    ), (
        diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4),
        AutoencoderKL(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4),
        lambda d, m: (d(x16).sample, m(x16)[0]),
    )]
    if HAS_VQ:
        pairs.append((
            diffusers.VQModel(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                              up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=3, norm_num_groups=4,
                              num_vq_embeddings=16),
            VQVAE(block_out_channels=(8, 16), latent_channels=3, norm_num_groups=4, num_embeddings=16),
            lambda d, m: (d(x16).sample, m(x16)[0]),
        ))
    return pairs


def test_diffusers_state_dicts_load_by_name():
    """The naming contract issue 8 builds on: a diffusers state dict loads with the one rename to_out.0 → to_out,
    and the outputs agree."""
    for theirs, ours, call in _diffusers_pairs():
        state = {k.replace(".to_out.0.", ".to_out."): v for k, v in theirs.state_dict().items()}
        ours.load_state_dict(state, strict=True)
        with torch.no_grad():
            ref, out = call(theirs.eval(), ours.eval())
        assert_rel_close(out, ref, 1e-5, what=f"{type(ours).__name__} vs diffusers {type(theirs).__name__}")
