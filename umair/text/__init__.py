"""The multi-perspective text encoder E^text (paper §2.3) and e_TSEM.

- :mod:`umair.text.pairs`: text pairs from three perspectives (multilingual name
  mappings, relations between entities, term explanations) read from TSV, JSONL or
  parquet, with a report of bad rows.
- :mod:`umair.text.settings`: :class:`FinetuneConfig` (light: no torch).
- :mod:`umair.text.finetune`: fine-tune a Sentence-Transformers model on the pairs
  (in-batch negatives), held-out retrieval before/after, params and metrics to a
  :class:`~umair.text.finetune.RunLogger`.
- :mod:`umair.text.cjk_tokens`: CJK characters unknown to the tokenizer added as tokens.
- :mod:`umair.text.batch_sampler`: batches in which no text and no group repeats.
- :mod:`umair.text.retrieval`: R@1 and MRR of anchor → positive retrieval.
- :mod:`umair.text.saved_encoder`: the saved model directory with ``umair_manifest.json``;
  loading it back.
- :mod:`umair.text.base_manifest`: ``base`` (the packaged all-MiniLM-L6-v2) or a plain
  Sentence-Transformers directory used as E^text, its manifest cached on first use.
- :mod:`umair.text.item_texts`: the text of each illustration from its text columns
  (string or list<string>), and the text feature-set version.
- :mod:`umair.text.tag_embeddings`: e_TSEM per illustration from that text (NULL without text).

Importing this package is cheap; the torch-heavy modules load on first use.
"""

from __future__ import annotations

from typing import Any

from umair.text.pairs import (
    PAIRS_SCHEMA,
    BadRow,
    BadRowsError,
    PairBuild,
    PairSource,
    build_pairs,
    pairs_table,
    read_pairs,
    write_pairs,
)

_LAZY = {
    "FinetuneConfig": "umair.text.settings",
    "FinetuneResult": "umair.text.finetune",
    "RunLogger": "umair.text.finetune",
    "finetune": "umair.text.finetune",
    "TextEncoder": "umair.text.saved_encoder",
    "load_text_encoder": "umair.text.saved_encoder",
    "read_manifest": "umair.text.saved_encoder",
    "add_cjk_tokens": "umair.text.cjk_tokens",
    "retrieval_metrics": "umair.text.retrieval",
    "embed_tags": "umair.text.tag_embeddings",
    "embed_texts": "umair.text.tag_embeddings",
    "resolve_text_model": "umair.text.base_manifest",
    "text_feature_version": "umair.text.item_texts",
    "TagEmbeddingStats": "umair.text.tag_embeddings",
}

__all__ = [
    "PAIRS_SCHEMA",
    "BadRow",
    "BadRowsError",
    "PairBuild",
    "PairSource",
    "build_pairs",
    "pairs_table",
    "read_pairs",
    "write_pairs",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'umair.text' has no attribute {name!r}")
