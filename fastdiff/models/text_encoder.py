"""A word tokenizer and a small transformer text encoder for digit prompts (text-to-image groundwork, issue 19).

* :class:`WordTokenizer`: a fixed word vocabulary (e.g. :data:`fastdiff.prompts.VOCABULARY`) plus the special
  tokens [PAD]=0, [UNK]=1, [BOS]=2, [EOS]=3; prompts → ``input_ids`` / ``attention_mask`` (B, max_length);
* :class:`TextEncoder` (:class:`TextEncoderConfig`): token + learned position embeddings, pre-LayerNorm transformer
  blocks with key-padding masks, a final LayerNorm; pooled output = the [EOS] token's state, ``text_embeds`` = its
  projection (for CLIP-style contrastive training with :func:`clip_loss`).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdiff.files import read_json_object, write_json_atomic
from fastdiff.models.modeling import ModelMixin, build_config, normalize_config
from fastdiff.prompts import VOCABULARY, split_words
from fastdiff.validation import check_int, check_positive_int, check_same_device

__all__ = ["WordTokenizer", "TextEncoder", "TextEncoderConfig", "TextEncoderOutput", "clip_loss",
           "PAD_ID", "UNK_ID", "BOS_ID", "EOS_ID", "SPECIAL_TOKENS", "TOKENIZER_NAME"]

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
TOKENIZER_NAME = "tokenizer.json"

PathLike = Union[str, os.PathLike]


# ----------------------------------------------------------------------------------------------- tokenizer


class WordTokenizer:
    """Whitespace/punctuation word tokenizer over a fixed vocabulary.

    Args:
        vocabulary: the words (each a single lower-case token as :func:`fastdiff.prompts.split_words` splits it,
            unique, not a special token); word ``i`` gets id ``4 + i``.
        max_length: the padded length of every encoding, BOS and EOS included (≥ 3).

    Calling it on prompts lowercases them, splits them into words and punctuation marks (``","`` is a token),
    maps unknown words to [UNK] (a warning once per tokenizer per word), truncates to ``max_length − 2`` words
    (a warning once per call) and returns ``[BOS] words… [EOS] [PAD]…``.
    """

    def __init__(self, vocabulary=None, max_length: int = 16):
        vocabulary = list(VOCABULARY) if vocabulary is None else vocabulary
        if isinstance(vocabulary, str) or not isinstance(vocabulary, (list, tuple)):
            raise TypeError(f"vocabulary must be a list of words, got {type(vocabulary).__name__}")
        if not vocabulary:
            raise ValueError("vocabulary must hold at least one word")
        seen = set()
        for i, word in enumerate(vocabulary):
            if not isinstance(word, str):
                raise TypeError(f"vocabulary[{i}] must be a str, got {type(word).__name__}")
            if word in SPECIAL_TOKENS or split_words(word) != [word]:
                raise ValueError(f"vocabulary[{i}] = {word!r} is not a single lower-case word or punctuation mark "
                                 f"(or is a special token)")
            if word in seen:
                raise ValueError(f"vocabulary[{i}] = {word!r} is a duplicate")
            seen.add(word)
        self.max_length = check_int("max_length", max_length, 3)
        self.vocabulary = list(vocabulary)
        self.id_to_token = list(SPECIAL_TOKENS) + self.vocabulary
        self.token_to_id = {t: i for i, t in enumerate(self.id_to_token)}
        self._warned_unknown: set[str] = set()

    @property
    def vocab_size(self) -> int:
        """Number of ids: the 4 special tokens plus the vocabulary."""
        return len(self.id_to_token)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size}, max_length={self.max_length})"

    def tokenize(self, prompt: str) -> list[str]:
        """The lower-cased word tokens of one prompt (no special tokens, no truncation)."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        return split_words(prompt)

    def __call__(self, prompts: Union[str, list[str]]) -> dict[str, Tensor]:
        """Encode ``prompts`` (one str or a non-empty list of str).

        Returns ``{"input_ids": (B, max_length) int64, "attention_mask": (B, max_length) int64}`` (1 on BOS, the
        words and EOS, 0 on padding). Raises ValueError naming ``prompts`` for an empty list, TypeError for a
        non-string item.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        elif not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a str or a list of str, got {type(prompts).__name__}")
        if len(prompts) == 0:
            raise ValueError("prompts must not be empty")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompts[{i}] must be a str, got {type(p).__name__}")
        limit = self.max_length - 2
        ids = torch.full((len(prompts), self.max_length), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(prompts), self.max_length), dtype=torch.long)
        truncated = 0
        for row, prompt in enumerate(prompts):
            words = split_words(prompt)
            if len(words) > limit:
                truncated += 1
                words = words[:limit]
            token_ids = [BOS_ID]
            for word in words:
                idx = self.token_to_id.get(word)
                if idx is None or idx < len(SPECIAL_TOKENS):
                    if word not in self._warned_unknown:
                        self._warned_unknown.add(word)
                        warnings.warn(f"WordTokenizer: unknown word {word!r} is encoded as [UNK]", stacklevel=2)
                    idx = UNK_ID
                token_ids.append(idx)
            token_ids.append(EOS_ID)
            ids[row, :len(token_ids)] = torch.tensor(token_ids, dtype=torch.long)
            mask[row, :len(token_ids)] = 1
        if truncated:
            warnings.warn(f"WordTokenizer: {truncated} prompt(s) longer than max_length − 2 = {limit} words were "
                          f"truncated to {limit} words", stacklevel=2)
        return {"input_ids": ids, "attention_mask": mask}

    def decode(self, ids) -> str:
        """The text of one encoding ``ids`` (a 1-D int tensor or a list of ints): [PAD], [BOS] and [EOS] are
        dropped, [UNK] is written as ``"[UNK]"``, words are joined by spaces with punctuation attached to the
        preceding word. ``decode(tok(p)["input_ids"][0])`` gives back an in-vocabulary prompt ``p`` written in
        lower case with single spaces and no space before punctuation (as every :func:`make_prompt` caption)."""
        if isinstance(ids, Tensor):
            if ids.ndim != 1 or ids.is_floating_point() or ids.is_complex():
                raise ValueError(f"ids must be a 1-D integer tensor, got shape {tuple(ids.shape)} dtype {ids.dtype}")
            ids = ids.tolist()
        if not isinstance(ids, (list, tuple)):
            raise TypeError(f"ids must be a 1-D integer tensor or a list of ints, got {type(ids).__name__}")
        text = ""
        for i, idx in enumerate(ids):
            if isinstance(idx, bool) or not isinstance(idx, int):
                raise TypeError(f"ids[{i}] must be an int, got {type(idx).__name__}")
            if not 0 <= idx < self.vocab_size:
                raise ValueError(f"ids[{i}] = {idx} is outside the vocabulary [0, {self.vocab_size})")
            if idx in (PAD_ID, BOS_ID, EOS_ID):
                continue
            token = self.id_to_token[idx]
            if text and (idx == UNK_ID or token[0].isalnum() or token[0] == "_"):
                text += " "
            text += token
        return text

    def save_pretrained(self, save_directory: PathLike) -> None:
        """Write ``tokenizer.json`` (vocabulary and max_length) into ``save_directory`` (created if needed)."""
        folder = Path(save_directory)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"save_directory {str(folder)!r} exists and is not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / TOKENIZER_NAME, {"_class_name": type(self).__name__, "max_length": self.max_length,
                                                    "vocabulary": self.vocabulary})

    @classmethod
    def from_pretrained(cls, pretrained_path: PathLike) -> "WordTokenizer":
        """Load a tokenizer written by :meth:`save_pretrained`. FileNotFoundError when the folder or file is
        missing; ValueError naming the file for invalid contents."""
        folder = Path(pretrained_path)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder {str(folder)!r} does not exist (or is not a folder)")
        path = folder / TOKENIZER_NAME
        values = read_json_object(path, missing=f"a WordTokenizer folder holds {TOKENIZER_NAME}",
                                  require=("_class_name",))
        if values["_class_name"] != cls.__name__:
            raise ValueError(f"{path}: holds a {values['_class_name']!r}, not a {cls.__name__!r}")
        try:
            return cls(values.get("vocabulary"), values.get("max_length"))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: invalid tokenizer: {exc}") from exc


# ----------------------------------------------------------------------------------------------- encoder


@dataclass
class TextEncoderConfig:
    vocab_size: int = len(SPECIAL_TOKENS) + len(VOCABULARY)  # ids, special tokens included
    max_length: int = 16  # longest sequence (number of position embeddings)
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4  # must divide hidden_size
    projection_dim: int = 64  # size of text_embeds

    def __post_init__(self):
        normalize_config(self)
        for name in ("vocab_size", "max_length", "hidden_size", "num_layers", "num_heads", "projection_dim"):
            check_positive_int(name, getattr(self, name))
        if self.vocab_size <= len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {self.vocab_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size must be a multiple of num_heads = {self.num_heads}, "
                             f"got {self.hidden_size}")


@dataclass
class TextEncoderOutput:
    """``last_hidden_state`` (B, M, hidden_size), ``pooler_output`` (B, hidden_size): the final state of each
    sequence's [EOS] token, ``text_embeds`` (B, projection_dim): the projected pooled state (not normalized)."""

    last_hidden_state: Tensor
    pooler_output: Tensor
    text_embeds: Tensor


class _EncoderLayer(nn.Module):
    """Pre-LayerNorm block: x + SelfAttention(LN(x)), then x + MLP(LN(x)) (GELU, 4× width)."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        b, m, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, m, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        # key_mask (B, 1, 1, M) bool, True = may be attended to: padding keys get weight exactly 0
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # (B, heads, M, c/heads)
        x = x + self.out(h.transpose(1, 2).reshape(b, m, c))
        return x + self.mlp(self.norm2(x))


class TextEncoder(ModelMixin):
    """Token ids (B, M) int64 → :class:`TextEncoderOutput`; a small CLIP-style text transformer.

    Padding positions (attention_mask 0) are masked out as attention keys, so they never change the states of the
    real positions (their own states are computed but meaningless).
    """

    config_class = TextEncoderConfig

    def __init__(self, config: Optional[TextEncoderConfig] = None, **overrides):
        super().__init__()
        cfg = self.config = build_config(TextEncoderConfig, config, overrides)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_length, cfg.hidden_size)
        self.layers = nn.ModuleList(_EncoderLayer(cfg.hidden_size, cfg.num_heads) for _ in range(cfg.num_layers))
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size)
        self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.01)

    def _check_inputs(self, input_ids, attention_mask) -> Tensor:
        cfg = self.config
        if not isinstance(input_ids, Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype != torch.long:
            raise TypeError(f"input_ids must be a LongTensor (int64), got dtype {input_ids.dtype}")
        if input_ids.ndim != 2 or input_ids.shape[0] < 1 or not 1 <= input_ids.shape[1] <= cfg.max_length:
            raise ValueError(f"input_ids must have shape (B, M) with B ≥ 1 and 1 ≤ M ≤ max_length = {cfg.max_length}, "
                             f"got {tuple(input_ids.shape)}")
        if bool(((input_ids < 0) | (input_ids >= cfg.vocab_size)).any()):
            raise ValueError(f"input_ids must lie in [0, vocab_size = {cfg.vocab_size}), got values in "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        if attention_mask is None:
            return input_ids != PAD_ID
        if not isinstance(attention_mask, Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}")
        if attention_mask.is_floating_point() or attention_mask.is_complex():
            raise TypeError(f"attention_mask must be an integer or bool tensor, got dtype {attention_mask.dtype}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        check_same_device(input_ids=input_ids, attention_mask=attention_mask)
        if attention_mask.dtype != torch.bool:
            if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
                raise ValueError("attention_mask must hold only 0 and 1")
            attention_mask = attention_mask == 1
        if not bool(attention_mask.any(dim=1).all()):
            raise ValueError("attention_mask must mark at least one real token in every row")
        return attention_mask

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> TextEncoderOutput:
        """Encode token ids.

        Args:
            input_ids: (B, M) int64, M ≤ max_length, ids in [0, vocab_size).
            attention_mask: (B, M) int/bool, 1 = real token, 0 = padding; None: every id ≠ [PAD] is real.
        Returns:
            :class:`TextEncoderOutput` with ``last_hidden_state`` (B, M, hidden_size), ``pooler_output``
            (B, hidden_size): the state at the first real [EOS] of each row (the last real token when a row has
            none), ``text_embeds`` (B, projection_dim), all in the model's dtype.
        Raises TypeError / ValueError naming ``input_ids`` or ``attention_mask`` before any work.
        """
        mask = self._check_inputs(input_ids, attention_mask)
        b, m = input_ids.shape
        positions = torch.arange(m, device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)[None]
        key_mask = mask[:, None, None, :]
        for layer in self.layers:
            x = layer(x, key_mask)
        x = self.final_layer_norm(x)
        is_eos = (input_ids == EOS_ID) & mask
        last_real = m - 1 - mask.flip(1).long().argmax(dim=1)
        first_eos = is_eos.long().argmax(dim=1)
        pool_index = torch.where(is_eos.any(dim=1), first_eos, last_real)
        pooled = x[torch.arange(b, device=x.device), pool_index]
        return TextEncoderOutput(last_hidden_state=x, pooler_output=pooled, text_embeds=self.text_projection(pooled))

    def get_text_features(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """``text_embeds`` (B, projection_dim) of :meth:`forward`."""
        return self(input_ids, attention_mask).text_embeds


# ----------------------------------------------------------------------------------------------- loss


def clip_loss(text_embeds: Tensor, image_embeds: Tensor, logit_scale: Union[float, Tensor]) -> Tensor:
    """Symmetric InfoNCE (CLIP) loss of paired embeddings: scalar tensor.

    ``text_embeds``, ``image_embeds``: (B, D) floating, row i of one paired with row i of the other (B ≥ 1);
    ``logit_scale``: the positive multiplier of the cosine similarities (CLIP's ``logit_scale.exp()``), a number or
    a one-element tensor (may require grad). With ``t``, ``v`` the L2-normalized rows and
    ``L = logit_scale · t vᵀ`` (B, B): ``(CE(L, arange(B)) + CE(Lᵀ, arange(B))) / 2`` (mean over rows).
    """
    for name, t in (("text_embeds", text_embeds), ("image_embeds", image_embeds)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating torch.Tensor, got "
                            f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
        if t.ndim != 2 or t.shape[0] < 1 or t.shape[1] < 1:
            raise ValueError(f"{name} must have shape (B, D), got {tuple(t.shape)}")
    if text_embeds.shape != image_embeds.shape:
        raise ValueError(f"image_embeds must have the shape of text_embeds {tuple(text_embeds.shape)}, "
                         f"got {tuple(image_embeds.shape)}")
    if isinstance(logit_scale, Tensor):
        if logit_scale.numel() != 1 or not logit_scale.is_floating_point():
            raise ValueError(f"logit_scale must be a one-element floating tensor, got shape "
                             f"{tuple(logit_scale.shape)} dtype {logit_scale.dtype}")
        value = float(logit_scale.detach())
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"logit_scale must be positive and finite, got {value}")
        scale = logit_scale.reshape(())
    else:
        if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)):
            raise TypeError(f"logit_scale must be a number or a tensor, got {type(logit_scale).__name__}")
        if not math.isfinite(logit_scale) or logit_scale <= 0:
            raise ValueError(f"logit_scale must be positive and finite, got {logit_scale}")
        scale = float(logit_scale)
    t = F.normalize(text_embeds, dim=-1)
    v = F.normalize(image_embeds, dim=-1)
    logits = scale * (t @ v.transpose(0, 1))
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.transpose(0, 1), labels)) / 2
