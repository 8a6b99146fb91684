"""The text of each illustration that E^text turns into e_TSEM, from any text columns.

``text_columns`` (default ``("tags",)``) names columns of the illustrations table, each
a string column (a title, a description) or a list<string> column (tags, genres):

- a string column contributes its stripped text (null or blank: nothing);
- a list<string> column contributes its stripped, non-empty items, each once, in the
  order first listed (today's tag handling).

Two ways to turn that into text (the ``text_mode`` of ``umair extract``):

- ``"dedup"``: every string value and every list item is one *piece*, cut to
  ``max_chars`` characters; e_TSEM is the mean of the distinct pieces' unit vectors.
  With only ``tags`` that is the mean of the distinct tags' vectors.
- ``"joined"``: the columns compose one text per item, in ``text_columns`` order:
  a list column's items joined with ``", "``, the columns joined with ``" | "``, the
  whole cut to ``max_chars`` characters, e.g. title + genres →
  ``"Toy Story (1995) | Adventure, Animation"``.

An item with no piece at all has no text: its e_TSEM is NULL (absent modality), never
the vector of an empty string.

:func:`text_feature_version` names the text feature set: the encoder's version plus
the columns, mode and ``max_chars``, so vectors made with other settings are never
mixed with these (the default ``tags`` / ``dedup`` / :data:`TEXT_MAX_CHARS` keeps the
bare encoder version, as feature sets made before these settings existed).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import pyarrow as pa

from umair.contracts import ContractError

TEXT_MAX_CHARS = 1000  # ~250 word pieces: MiniLM reads at most 256 tokens, longer text is cut anyway
PIECE_SEPARATOR = ", "  # between the items of one list column ("joined")
COLUMN_SEPARATOR = " | "  # between the columns ("joined")
DEFAULT_COLUMNS = ("tags",)
DEFAULT_MODE = "dedup"


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_string_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and _is_string(t.value_type)


def check_text_columns(schema: pa.Schema, columns: Sequence[str], file: str) -> None:
    """Raise :class:`ContractError` (naming ``file``, the key ``text_columns`` and the column)
    unless every one of ``columns`` is in ``schema`` as a string or list<string> column."""
    for col in columns:
        if col not in schema.names:
            raise ContractError(
                file,
                col,
                "text_columns: a column of the illustrations table",
                f"no such column (columns: {', '.join(schema.names)})",
            )
        t = schema.field(col).type
        if not (_is_string(t) or _is_string_list(t)):
            raise ContractError(file, col, "text_columns: a string or list<string> column", str(t))


def _column_parts(values: list, is_list: bool) -> list[list[str]]:
    out = []
    for v in values:
        if is_list:
            clean = [s.strip() for s in (v or []) if s is not None and s.strip()]
            out.append(list(dict.fromkeys(clean)))
        else:
            s = v.strip() if v is not None else ""
            out.append([s] if s else [])
    return out


def column_parts(table: pa.Table, columns: Sequence[str], file: str = "<illustrations>") -> list[list[list[str]]]:
    """Per row, per column of ``columns``: the stripped, distinct, non-empty strings it holds."""
    check_text_columns(table.schema, columns, file)
    per_col = [_column_parts(table.column(c).to_pylist(), _is_string_list(table.schema.field(c).type)) for c in columns]
    return [list(row) for row in zip(*per_col, strict=True)] if per_col else [[] for _ in range(table.num_rows)]


def pieces(parts: list[list[str]], max_chars: int = TEXT_MAX_CHARS) -> list[str]:
    """The distinct pieces of one item (``"dedup"``): every value, cut to ``max_chars``."""
    return list(dict.fromkeys(p[:max_chars] for col in parts for p in col))


def compose(parts: list[list[str]], max_chars: int = TEXT_MAX_CHARS) -> str | None:
    """The one text of an item (``"joined"``), or None when it has no text at all."""
    text = COLUMN_SEPARATOR.join(PIECE_SEPARATOR.join(col) for col in parts if col)
    return text[:max_chars] if text else None


def text_feature_version(
    model_version: str,
    columns: Sequence[str] = DEFAULT_COLUMNS,
    mode: str = DEFAULT_MODE,
    max_chars: int = TEXT_MAX_CHARS,
) -> str:
    """The version of an e_TSEM feature set: ``model_version`` for the default settings,
    else ``<model_version>+tsem:<mode>:<max_chars>:<columns as JSON>``."""
    if tuple(columns) == DEFAULT_COLUMNS and mode == DEFAULT_MODE and max_chars == TEXT_MAX_CHARS:
        return model_version
    return f"{model_version}+tsem:{mode}:{max_chars}:{json.dumps(list(columns), ensure_ascii=False)}"
