"""fastdiff.models.text_encoder: WordTokenizer, TextEncoder (+ checkpoints) and clip_loss."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from fastdiff.models import TextEncoder, TextEncoderConfig, WordTokenizer, load_model
from fastdiff.models.text_encoder import BOS_ID, EOS_ID, PAD_ID, UNK_ID, TextEncoderOutput, clip_loss
from fastdiff.prompts import VOCABULARY, make_prompt

VOCAB = ["a", "bold", "seven", "the", "digit", "4", ",", "slanted", "right"]


# ----------------------------------------------------------------------------------------------- tokenizer


def test_encoding_layout():
    tok = WordTokenizer(VOCAB, max_length=8)
    enc = tok(["A bold SEVEN", "the digit 4, slanted right"])
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids.dtype == torch.long and mask.dtype == torch.long and ids.shape == (2, 8) == mask.shape
    w = {t: 4 + i for i, t in enumerate(VOCAB)}
    assert ids[0].tolist() == [BOS_ID, w["a"], w["bold"], w["seven"], EOS_ID, PAD_ID, PAD_ID, PAD_ID]
    assert mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert ids[1].tolist() == [BOS_ID, w["the"], w["digit"], w["4"], w[","], w["slanted"], w["right"], EOS_ID]
    assert mask[1].tolist() == [1] * 8
    assert tok("a seven")["input_ids"].shape == (1, 8)  # a single str is a batch of one
    assert tok.vocab_size == len(tok) == 4 + len(VOCAB)


def test_decode_round_trip():
    tok = WordTokenizer(VOCABULARY)
    g = torch.Generator().manual_seed(0)
    prompts = [make_prompt(i % 10, {"thickness": "bold", "slant": "slanted right"}, g) for i in range(200)]
    ids = tok(prompts)["input_ids"]
    assert [tok.decode(row) for row in ids] == prompts
    bold = tok.token_to_id["bold"]
    assert tok.decode([BOS_ID, UNK_ID, bold, tok.token_to_id[","], UNK_ID, EOS_ID, PAD_ID]) == "[UNK] bold, [UNK]"
    with pytest.raises(ValueError, match="ids"):
        tok.decode(ids)  # 2-D
    with pytest.raises(ValueError, match=r"ids\[1\]"):
        tok.decode([BOS_ID, 10_000])


def test_truncation_warns_once_per_call():
    tok = WordTokenizer(VOCAB, max_length=5)
    with pytest.warns(UserWarning, match="truncated") as record:
        enc = tok(["the digit 4, slanted right", "a bold seven , right"])
    assert sum("truncated" in str(r.message) for r in record) == 1
    w = {t: 4 + i for i, t in enumerate(VOCAB)}
    assert enc["input_ids"][0].tolist() == [BOS_ID, w["the"], w["digit"], w["4"], EOS_ID]
    assert enc["attention_mask"].tolist() == [[1] * 5, [1] * 5]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok(["a bold seven"])  # exactly max_length − 2 words: no warning


def test_unknown_word_warns_once_per_word():
    tok = WordTokenizer(VOCAB)
    with pytest.warns(UserWarning, match="'eight'"):
        enc = tok("a bold eight")
    assert enc["input_ids"][0, 3].item() == UNK_ID
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok(["the eight", "eight"])  # already warned about this word
    with pytest.warns(UserWarning, match="'nine'"):
        tok("nine")


def test_tokenizer_bad_inputs():
    tok = WordTokenizer(VOCAB)
    with pytest.raises(ValueError, match="prompts"):
        tok([])
    with pytest.raises(TypeError, match=r"prompts\[1\]"):
        tok(["a", 7])
    with pytest.raises(TypeError, match="prompts"):
        tok(7)
    with pytest.raises(ValueError, match="max_length"):
        WordTokenizer(VOCAB, max_length=2)
    with pytest.raises(ValueError, match=r"vocabulary\[1\]"):
        WordTokenizer(["a", "a"])
    with pytest.raises(ValueError, match=r"vocabulary\[0\]"):
        WordTokenizer(["Bold"])
    with pytest.raises(TypeError, match="vocabulary"):
        WordTokenizer("abc")


def test_tokenizer_save_load(tmp_path):
    tok = WordTokenizer(VOCAB, max_length=9)
    tok.save_pretrained(tmp_path / "tok")
    data = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    assert data["vocabulary"] == VOCAB and data["max_length"] == 9
    back = WordTokenizer.from_pretrained(tmp_path / "tok")
    assert back.vocabulary == VOCAB and back.max_length == 9
    assert torch.equal(back("the digit 4")["input_ids"], tok("the digit 4")["input_ids"])
    with pytest.raises(FileNotFoundError):
        WordTokenizer.from_pretrained(tmp_path / "missing")
    data["max_length"] = 1
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="max_length"):
        WordTokenizer.from_pretrained(tmp_path / "tok")


# ----------------------------------------------------------------------------------------------- encoder


def _model(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=4 + len(VOCAB), max_length=16, hidden_size=32, num_layers=2, num_heads=4, projection_dim=8)
    cfg.update(kw)
    return TextEncoder(**cfg).eval()


def test_default_config_fits_vocabulary():
    cfg = TextEncoderConfig()
    assert cfg.vocab_size == WordTokenizer(VOCABULARY).vocab_size and cfg.max_length == 16
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.projection_dim) == (64, 2, 4, 64)


def test_output_shapes_and_pooling():
    model = _model()
    enc = WordTokenizer(VOCAB, max_length=16)(["a bold seven", "the digit 4, slanted right"])
    out = model(enc["input_ids"], enc["attention_mask"])
    assert isinstance(out, TextEncoderOutput)
    assert out.last_hidden_state.shape == (2, 16, 32)
    assert out.pooler_output.shape == (2, 32) and out.text_embeds.shape == (2, 8)
    eos = [4, 7]  # positions of [EOS]
    for b in range(2):
        assert torch.equal(out.pooler_output[b], out.last_hidden_state[b, eos[b]])
    torch.testing.assert_close(out.text_embeds, out.pooler_output @ model.text_projection.weight.T)
    assert torch.isfinite(out.last_hidden_state).all()
    # attention_mask=None: derived from the [PAD] ids
    out2 = model(enc["input_ids"])
    torch.testing.assert_close(out2.pooler_output, out.pooler_output, rtol=0, atol=1e-6)


def test_padding_does_not_change_real_positions():
    model = _model()
    prompts = ["a bold seven", "the digit 4, slanted right"]
    short = WordTokenizer(VOCAB, max_length=9)(prompts)
    long = WordTokenizer(VOCAB, max_length=16)(prompts)
    a = model(short["input_ids"], short["attention_mask"])
    b = model(long["input_ids"], long["attention_mask"])
    for row, n in enumerate([5, 8]):
        torch.testing.assert_close(a.last_hidden_state[row, :n], b.last_hidden_state[row, :n], rtol=0, atol=1e-6)
    torch.testing.assert_close(a.pooler_output, b.pooler_output, rtol=0, atol=1e-6)
    # garbage ids at masked positions do not matter either
    ids = long["input_ids"].clone()
    ids[long["attention_mask"] == 0] = 7
    c = model(ids, long["attention_mask"])
    torch.testing.assert_close(c.last_hidden_state[0, :5], b.last_hidden_state[0, :5], rtol=0, atol=1e-6)
    # ...but real tokens do (the mask is not masking everything)
    ids[0, 2] = 6
    d = model(ids, long["attention_mask"])
    assert (d.pooler_output[0] - b.pooler_output[0]).abs().max() > 1e-4


def test_encoder_bad_inputs():
    model = _model(max_length=8)
    ids = torch.tensor([[BOS_ID, 5, EOS_ID]])
    with pytest.raises(TypeError, match="input_ids"):
        model(ids.int())
    with pytest.raises(TypeError, match="input_ids"):
        model([[2, 5, 3]])
    with pytest.raises(ValueError, match="input_ids"):
        model(ids[0])
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.full((1, 9), 5))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.tensor([[BOS_ID, 4 + len(VOCAB), EOS_ID]]))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.tensor([[BOS_ID, -1, EOS_ID]]))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="attention_mask"):
        model(ids, torch.ones(1, 3))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, torch.tensor([[1, 2, 1]]))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden_size"):
        TextEncoderConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="vocab_size"):
        TextEncoderConfig(vocab_size=4)
    with pytest.raises(TypeError, match="num_layers"):
        TextEncoderConfig(num_layers=1.5)


def test_save_load_round_trip(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path / "enc")
    assert (tmp_path / "enc" / "config.json").is_file() and (tmp_path / "enc" / "model.safetensors").is_file()
    cfg = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert cfg["_class_name"] == "TextEncoder" and cfg["hidden_size"] == 32
    back = TextEncoder.from_pretrained(tmp_path / "enc")
    also = load_model(tmp_path / "enc")
    assert back.config == model.config and type(also) is TextEncoder
    ids = WordTokenizer(VOCAB)(["a bold seven"])["input_ids"]
    assert torch.equal(back(ids).text_embeds, model(ids).text_embeds)
    assert torch.equal(also(ids).last_hidden_state, model(ids).last_hidden_state)
    state = back.state_dict()
    assert all(torch.equal(t, state[k]) for k, t in model.state_dict().items())


def test_backward_reaches_every_parameter():
    model = _model().train()
    enc = WordTokenizer(VOCAB)(["a bold seven", "the digit 4, slanted right"])
    out = model(**enc)
    clip_loss(out.text_embeds, torch.randn(2, 8), 10.0).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    # position embeddings of never-seen positions get zero (not None) grads; every parameter takes part
    assert unused == []


# ----------------------------------------------------------------------------------------------- clip_loss


def test_clip_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 5, generator=g, dtype=torch.float64)
    v = torch.randn(3, 5, generator=g, dtype=torch.float64)
    scale = 7.0

    def norm(row):
        n = math.sqrt(sum(a * a for a in row))
        return [a / n for a in row]

    tn, vn = [norm(r) for r in t.tolist()], [norm(r) for r in v.tolist()]
    sim = [[scale * sum(a * b for a, b in zip(tn[i], vn[j])) for j in range(3)] for i in range(3)]

    def ce(rows):
        return sum(math.log(sum(math.exp(x) for x in rows[i])) - rows[i][i] for i in range(3)) / 3

    expected = (ce(sim) + ce([list(col) for col in zip(*sim)])) / 2
    assert clip_loss(t, v, scale).item() == pytest.approx(expected, abs=1e-12)
    got = clip_loss(t.float(), v.float(), torch.tensor(scale, requires_grad=True))
    assert got.item() == pytest.approx(expected, abs=1e-5)
    # symmetric: swapping the towers gives the same loss
    assert clip_loss(v, t, scale).item() == pytest.approx(expected, abs=1e-12)


def test_clip_loss_bad_inputs():
    t = torch.randn(2, 4)
    with pytest.raises(ValueError, match="image_embeds"):
        clip_loss(t, torch.randn(3, 4), 1.0)
    with pytest.raises(ValueError, match="text_embeds"):
        clip_loss(torch.randn(4), torch.randn(4), 1.0)
    with pytest.raises(TypeError, match="image_embeds"):
        clip_loss(t, torch.ones(2, 4, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match="logit_scale"):
        clip_loss(t, t, 0.0)
    with pytest.raises(ValueError, match="logit_scale"):
        clip_loss(t, t, torch.ones(2))
    with pytest.raises(TypeError, match="logit_scale"):
        clip_loss(t, t, "10")
