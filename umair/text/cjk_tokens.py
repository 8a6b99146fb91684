"""CJK characters the tokenizer does not know, added as tokens of their own.

An English tokenizer (all-MiniLM-L6-v2's WordPiece) maps most Han, Kana and Hangul
characters to its unknown token, so "月" and "猫" would embed identically. Before
fine-tuning, :func:`add_cjk_tokens` adds every such character of the training pairs as a
token and resizes the model's token embeddings; training then learns them.

The new rows do not start from the resize default. With ``init="variant"`` (the
default) a character whose variant is already in the vocabulary starts from that
token's embedding: its Unicode compatibility decomposition (CJK compatibility
ideographs, half-width katakana: NFKC) or its other kana (hiragana ↔ katakana). Every
other new character gets a distinct seeded random vector with the per-dimension mean and
spread of the existing embeddings (:func:`init_new_embeddings`). (A Simplified ↔
Traditional table would find more variants: on bangumi-titles 55 instead of 14 of 2,462
added characters with ``hanziconv``'s; it is not a dependency.) ``init="resize"`` keeps the resize default.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

# Unicode ranges of the CJK scripts: Han (with 々 〇 and the other Han-script marks),
# Hiragana, Katakana (with the phonetic extension and half-width forms), Hangul.
CJK_RANGES: tuple[tuple[int, int], ...] = (
    (0x3005, 0x3005),
    (0x3007, 0x3007),
    (0x3021, 0x3029),
    (0x3038, 0x303B),
    (0x3400, 0x4DBF),
    (0x4E00, 0x9FFF),
    (0xF900, 0xFAFF),
    (0x20000, 0x323AF),
    (0x3041, 0x309F),
    (0x30A0, 0x30FF),
    (0x31F0, 0x31FF),
    (0xFF66, 0xFF9F),
    (0x1100, 0x11FF),
    (0x3130, 0x318F),
    (0xA960, 0xA97F),
    (0xAC00, 0xD7AF),
    (0xD7B0, 0xD7FF),
)


def is_cjk(ch: str) -> bool:
    """True when the character ``ch`` is Han, Hiragana, Katakana or Hangul (:data:`CJK_RANGES`)."""
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in CJK_RANGES)


def unknown_cjk_chars(tokenizer: Any, texts: Sequence[str]) -> list[str]:
    """CJK characters of ``texts`` that ``tokenizer`` turns into its unknown token, alone or
    inside a word (WordPiece needs a ``##x`` piece there), sorted by code point."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:  # byte-level tokenizers have no unknown token
        return []
    chars = sorted({ch for t in texts for ch in t if is_cjk(ch)})
    out = []
    for ch in chars:
        for probe in (ch, "a" + ch):
            if unk in tokenizer(probe, add_special_tokens=False)["input_ids"]:
                out.append(ch)
                break
    return out


def variants(ch: str) -> list[str]:
    """Other forms of the character ``ch``, best first: NFKC (compatibility ideographs,
    half-width kana), the other kana script. ``ch`` itself is never listed."""
    out: list[str] = [unicodedata.normalize("NFKC", ch)]
    base = out[-1] if len(out[-1]) == 1 else ch
    cp = ord(base)
    if 0x3041 <= cp <= 0x3096:  # hiragana → katakana
        out.append(chr(cp + 0x60))
    elif 0x30A1 <= cp <= 0x30F6:  # katakana → hiragana
        out.append(chr(cp - 0x60))
    seen: set[str] = {ch}
    return [v for v in out if len(v) == 1 and not (v in seen or seen.add(v))]


def _known_id(vocab: dict[str, int], ch: str, first_new: int) -> int | None:
    """Id (below ``first_new``) of ``ch`` as a token of its own, else as a word piece (``##ch``)."""
    for piece in (ch, "##" + ch):
        if vocab.get(piece, first_new) < first_new:
            return vocab[piece]
    return None


@torch.no_grad()
def init_new_embeddings(
    weight: torch.Tensor, tokenizer: Any, chars: Sequence[str], first_new: int, seed: int = 0
) -> dict[str, str]:
    """Set the rows ``first_new + k`` of ``weight`` (the new tokens ``chars``): a copy of a
    known variant's row (:func:`variants`), else a seeded random vector with the
    per-dimension mean and standard deviation of rows ``[:first_new]``. Returns
    ``{new char: variant whose row it copied}``."""
    old = weight[:first_new].float()
    mean, std = old.mean(0), old.std(0)
    gen = torch.Generator().manual_seed(seed)
    vocab = tokenizer.get_vocab()
    unk = getattr(tokenizer, "unk_token_id", None)
    known = {t: i for t, i in vocab.items() if i != unk}
    copied: dict[str, str] = {}
    for k, ch in enumerate(chars):
        row = first_new + k
        src = next(((v, i) for v in variants(ch) if (i := _known_id(known, v, first_new)) is not None), None)
        if src is not None:
            weight[row] = weight[src[1]]
            copied[ch] = src[0]
        else:
            weight[row] = (mean + std * torch.randn(mean.shape, generator=gen)).to(weight.dtype)
    return copied


def add_cjk_tokens(model: SentenceTransformer, texts: Sequence[str], init: str = "variant", seed: int = 0) -> list[str]:
    """Add the unknown CJK characters of ``texts`` as tokens and resize the embeddings;
    ``init="variant"`` sets their rows with :func:`init_new_embeddings` (``"resize"``:
    leave the resize default).

    Tokens are matched on the raw text (``normalized=False``), so accent stripping or
    lower-casing in the tokenizer's normaliser cannot undo them. Returns what was added.
    """
    from tokenizers import AddedToken

    if init not in ("variant", "resize"):
        raise ValueError(f"init must be 'variant' or 'resize', not {init!r}")
    tokenizer = model.tokenizer
    chars = unknown_cjk_chars(tokenizer, texts)
    if chars:
        first_new = len(tokenizer)
        tokenizer.add_tokens([AddedToken(c, normalized=False, single_word=False) for c in chars])
        auto = model[0].auto_model
        auto.resize_token_embeddings(len(tokenizer))
        if init == "variant":
            ids = tokenizer.convert_tokens_to_ids(chars)
            if ids != list(range(first_new, first_new + len(chars))):
                raise RuntimeError("added CJK tokens did not get consecutive ids after the vocabulary")
            init_new_embeddings(auto.get_input_embeddings().weight, tokenizer, chars, first_new, seed)
    return chars
