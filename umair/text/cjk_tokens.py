"""CJK characters the tokenizer does not know, added as tokens of their own.

An English tokenizer (all-MiniLM-L6-v2's WordPiece) maps most Han, Kana and Hangul
characters to its unknown token, so "月" and "猫" would embed identically. Before
fine-tuning, :func:`add_cjk_tokens` adds every such character of the training pairs as a
token and resizes the model's token embeddings; training then learns them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

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


def add_cjk_tokens(model: SentenceTransformer, texts: Sequence[str]) -> list[str]:
    """Add the unknown CJK characters of ``texts`` as tokens and resize the embeddings.

    Tokens are matched on the raw text (``normalized=False``), so accent stripping or
    lower-casing in the tokenizer's normaliser cannot undo them. Returns what was added.
    """
    from tokenizers import AddedToken

    tokenizer = model.tokenizer
    chars = unknown_cjk_chars(tokenizer, texts)
    if chars:
        tokenizer.add_tokens([AddedToken(c, normalized=False, single_word=False) for c in chars])
        model[0].auto_model.resize_token_embeddings(len(tokenizer))
    return chars
