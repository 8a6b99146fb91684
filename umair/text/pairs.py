"""Text pairs for fine-tuning the text encoder E^text, from three perspectives (paper §2.3).

Each input file holds one kind of record; the builder turns every record into
(anchor, positive) pairs for an in-batch-negatives contrastive loss:

- ``names``: columns ``entity`` (or ``concept``), ``lang``, ``name``. Perspective
  ``multilingual``: every two distinct names of one entity in different languages,
  the name listed first as the anchor.
- ``pairs``: columns ``src_lang``, ``src_title``, ``tgt_lang``, ``tgt_title`` (the
  bangumi-titles form). Perspective ``multilingual``: src_title → tgt_title.
- ``relations``: columns ``head``, ``relation``, ``tail`` (series–character,
  character–character, ...). Perspective ``relation``: "<head>'s <relation>" → tail.
- ``explanations``: columns ``term``, ``description``. Perspective ``explanation``:
  term → description.

Files are TSV (``.tsv``; a header line, tab-separated fields, no quoting), JSON lines
(``.jsonl``/``.ndjson``; one object per line) or parquet (``.parquet``), chosen by
extension; other columns are ignored. Blank lines are skipped. Values are stripped of
surrounding whitespace. Ids (``entity``/``concept``) may be strings or integers; every
other field must be a string.

Output (:data:`PAIRS_SCHEMA`): ``anchor``, ``positive``, ``perspective``, ``source`` (the
file name) and ``group``: the entity a pair is about (entity id, src_title, head or
term), which :mod:`umair.text.finetune` uses to keep an entity on one side of the
held-out split. Exact (anchor, positive) duplicates keep their first occurrence; pairs
whose two sides are equal teach nothing and are dropped too (both counted in the stats).

Bad rows: a row with a missing or null field, a field that is empty after stripping, a
non-string text field, a TSV line with the wrong number of fields, a line that is not
UTF-8, or a JSONL line that is not a JSON object. By default the builder is lenient:
it skips them and returns every one as a :class:`BadRow` (file, 1-based line, reason;
for TSV the header is line 1, for parquet ``line`` is the 1-based row number).
``strict=True`` raises :class:`BadRowsError` listing them instead. Problems with a whole
file (unknown extension, no header, a required column absent from the file, a parquet
column of the wrong type) always raise :class:`umair.contracts.ContractError` naming
the file and the column. In JSONL a required key that no object has is a missing
column; a key only some objects lack makes those rows bad.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from umair import storage
from umair.contracts import ContractError
from umair.errors import UmairError

Kind = Literal["names", "pairs", "relations", "explanations"]
Perspective = Literal["multilingual", "relation", "explanation"]

PAIRS_SCHEMA = pa.schema(
    [
        ("anchor", pa.string()),
        ("positive", pa.string()),
        ("perspective", pa.string()),
        ("source", pa.string()),
        ("group", pa.string()),
    ]
)
PERSPECTIVES: dict[str, Perspective] = {
    "names": "multilingual",
    "pairs": "multilingual",
    "relations": "relation",
    "explanations": "explanation",
}
# kind -> required columns; for "names" the id column may be spelled "entity" or "concept".
REQUIRED: dict[str, tuple[str, ...]] = {
    "names": ("entity", "lang", "name"),
    "pairs": ("src_lang", "src_title", "tgt_lang", "tgt_title"),
    "relations": ("head", "relation", "tail"),
    "explanations": ("term", "description"),
}
ID_ALIASES = ("entity", "concept")
RELATION_TEMPLATE = "{head}'s {relation}"  # the paper's form: "Naruto's character"


@dataclass(frozen=True)
class BadRow:
    """A skipped input row: the file, its 1-based line (TSV/JSONL) or row (parquet), and why."""

    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


class BadRowsError(UmairError, ValueError):
    """Strict mode found bad rows; ``bad_rows`` lists all of them."""

    def __init__(self, bad_rows: Sequence[BadRow], shown: int = 20):
        self.bad_rows = list(bad_rows)
        lines = [str(b) for b in self.bad_rows[:shown]]
        more = len(self.bad_rows) - shown
        if more > 0:
            lines.append(f"... and {more} more")
        super().__init__(f"{len(self.bad_rows)} bad row(s) in the text-pair inputs:\n" + "\n".join(lines))


@dataclass(frozen=True)
class PairSource:
    """One input file and the kind of records it holds."""

    uri: str
    kind: Kind


@dataclass
class PairBuild:
    """What :func:`build_pairs` returns: the pairs table, the bad rows and counts."""

    table: pa.Table
    bad_rows: list[BadRow] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    def bad_rows_table(self) -> pa.Table:
        return bad_rows_table(self.bad_rows)


def bad_rows_table(bad_rows: Sequence[BadRow]) -> pa.Table:
    """The report as a table (file, line, reason), e.g. to write next to the pairs."""
    return pa.table(
        {
            "file": pa.array([b.file for b in bad_rows], pa.string()),
            "line": pa.array([b.line for b in bad_rows], pa.int64()),
            "reason": pa.array([b.reason for b in bad_rows], pa.string()),
        }
    )


# ---------------------------------------------------------------------------------------
# Reading records: (line number, dict) from TSV, JSONL or parquet


def _file_name(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/")) if storage.is_s3(uri) else os.path.basename(uri)


def _format_of(uri: str) -> str:
    low = uri.lower()
    for ext, fmt in ((".tsv", "tsv"), (".jsonl", "jsonl"), (".ndjson", "jsonl"), (".parquet", "parquet")):
        if low.endswith(ext):
            return fmt
    raise ContractError(uri, None, "a .tsv, .jsonl, .ndjson or .parquet file", f"extension of {_file_name(uri)!r}")


def _required_for(kind: str, columns: Iterable[str], uri: str) -> tuple[str, ...]:
    """The required columns of ``kind`` as spelled in this file; raise if one is absent."""
    have = list(columns)
    out = []
    for col in REQUIRED[kind]:
        if col == "entity":
            found = next((a for a in ID_ALIASES if a in have), None)
            if found is None:
                raise ContractError(
                    uri,
                    "entity",
                    f"an id column 'entity' or 'concept' (kind '{kind}')",
                    f"no such column (columns: {', '.join(have) or 'none'})",
                )
            out.append(found)
        elif col not in have:
            raise ContractError(
                uri, col, f"a column '{col}' (kind '{kind}')", f"no such column (columns: {', '.join(have) or 'none'})"
            )
        else:
            out.append(col)
    return tuple(out)


def _split_lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line without its end-of-line) for every line."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for i, raw in enumerate(data.split(b"\n"), start=1):
        yield i, raw.rstrip(b"\r")


def _tsv_records(uri: str, data: bytes, kind: str, bad: list[BadRow]) -> Iterator[tuple[int, dict[str, Any]]]:
    name = _file_name(uri)
    lines = _split_lines(data)
    header: list[str] | None = None
    for lineno, raw in lines:
        if raw.strip():
            try:
                header = [h.strip() for h in raw.decode("utf-8").split("\t")]
            except UnicodeDecodeError:
                raise ContractError(uri, None, "a UTF-8 header line", f"undecodable bytes on line {lineno}") from None
            break
    if header is None:
        raise ContractError(uri, None, "a header line naming the columns", "an empty file")
    _required_for(kind, header, uri)
    for lineno, raw in lines:
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            bad.append(BadRow(name, lineno, f"not valid UTF-8 ({err.reason} at byte {err.start})"))
            continue
        fields = text.split("\t")
        if len(fields) != len(header):
            if len(fields) < len(header):
                missing = ", ".join(repr(h) for h in header[len(fields) :])
                reason = f"{len(fields)} fields where the header has {len(header)}: missing {missing}"
            else:
                reason = f"{len(fields)} fields where the header has {len(header)} (a stray tab?)"
            bad.append(BadRow(name, lineno, reason))
            continue
        yield lineno, dict(zip(header, fields, strict=True))


def _jsonl_records(uri: str, data: bytes, kind: str, bad: list[BadRow]) -> Iterator[tuple[int, dict[str, Any]]]:
    name = _file_name(uri)
    records: list[tuple[int, dict[str, Any]]] = []
    seen_keys: set[str] = set()
    for lineno, raw in _split_lines(data):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            bad.append(BadRow(name, lineno, f"not valid UTF-8 ({err.reason} at byte {err.start})"))
            continue
        except json.JSONDecodeError as err:
            bad.append(BadRow(name, lineno, f"not valid JSON ({err.msg} at column {err.colno})"))
            continue
        if not isinstance(obj, dict):
            bad.append(BadRow(name, lineno, f"not a JSON object (found {type(obj).__name__})"))
            continue
        seen_keys.update(obj)
        records.append((lineno, obj))
    if records:  # a key no object has is a missing column, not a bad row
        _required_for(kind, seen_keys, uri)
    yield from records


def _parquet_records(
    uri: str, kind: str, settings: storage.StorageSettings | None
) -> Iterator[tuple[int, dict[str, Any]]]:
    table = storage.read_parquet(uri, settings)
    cols = _required_for(kind, table.column_names, uri)
    for col in cols:
        t = table.schema.field(col).type
        ok = pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t)
        if col in ID_ALIASES:
            ok = ok or pa.types.is_integer(t)
        if not ok:
            expected = "string or integer" if col in ID_ALIASES else "string"
            raise ContractError(uri, col, expected, str(t))
    pylists = {c: table.column(c).to_pylist() for c in cols}
    for i in range(table.num_rows):
        yield i + 1, {c: pylists[c][i] for c in cols}


def read_records(
    uri: str, kind: Kind, settings: storage.StorageSettings | None = None
) -> tuple[list[tuple[int, dict[str, Any]]], list[BadRow]]:
    """Parse one file into (line, record) pairs plus the lines that could not be parsed."""
    if kind not in REQUIRED:
        raise ValueError(f"unknown pair-source kind {kind!r}; expected one of {sorted(REQUIRED)}")
    fmt = _format_of(uri)
    bad: list[BadRow] = []
    if fmt == "parquet":
        return list(_parquet_records(uri, kind, settings)), bad
    data = storage.read_bytes(uri, settings)
    reader = _tsv_records if fmt == "tsv" else _jsonl_records
    return list(reader(uri, data, kind, bad)), bad


# ---------------------------------------------------------------------------------------
# Records to pairs


def _clean(rec: Mapping[str, Any], cols: Sequence[str], id_col: str | None) -> tuple[list[str] | None, str | None]:
    """Stripped field values, or None and the reason the record is bad."""
    out = []
    for c in cols:
        v = rec.get(c)
        if v is None:
            return None, f"missing field '{c}'"
        if c == id_col and isinstance(v, int) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str):
            return None, f"field '{c}' is not a string (found {type(v).__name__})"
        v = v.strip()
        if not v:
            return None, f"field '{c}' is empty"
        out.append(v)
    return out, None


def pairs_from_records(
    records: Iterable[tuple[int, Mapping[str, Any]]] | Iterable[Mapping[str, Any]],
    kind: Kind,
    source: str = "<records>",
) -> tuple[list[tuple[str, str, str]], list[BadRow]]:
    """(anchor, positive, group) triples from records of one ``kind``, plus the bad rows.

    ``records`` are dicts (numbered 1, 2, ... in the report) or (line, dict) tuples.
    """
    if kind not in REQUIRED:
        raise ValueError(f"unknown pair-source kind {kind!r}; expected one of {sorted(REQUIRED)}")
    numbered: list[tuple[int, Mapping[str, Any]]] = [
        r if isinstance(r, tuple) else (i, r)
        for i, r in enumerate(records, start=1)  # type: ignore[misc]
    ]
    bad: list[BadRow] = []
    out: list[tuple[str, str, str]] = []
    if kind == "names":
        keys = {k for _, r in numbered for k in r}
        id_col = next((a for a in ID_ALIASES if a in keys), "entity")
        entities: dict[str, list[tuple[str, str]]] = {}  # entity -> [(lang, name)] in input order
        for line, rec in numbered:
            vals, why = _clean(rec, (id_col, "lang", "name"), id_col)
            if vals is None:
                bad.append(BadRow(source, line, why or "bad row"))
                continue
            ent, lang, name = vals
            names = entities.setdefault(ent, [])
            if (lang, name) not in names:
                names.append((lang, name))
        for ent, names in entities.items():
            for i, (lang_a, a) in enumerate(names):
                for lang_b, b in names[i + 1 :]:
                    if lang_a != lang_b:
                        out.append((a, b, ent))
        return out, bad
    cols = {
        "pairs": ("src_lang", "src_title", "tgt_lang", "tgt_title"),
        "relations": ("head", "relation", "tail"),
        "explanations": ("term", "description"),
    }[kind]
    for line, rec in numbered:
        vals, why = _clean(rec, cols, None)
        if vals is None:
            bad.append(BadRow(source, line, why or "bad row"))
            continue
        if kind == "pairs":
            out.append((vals[1], vals[3], vals[1]))
        elif kind == "relations":
            head, relation, tail = vals
            out.append((RELATION_TEMPLATE.format(head=head, relation=relation), tail, head))
        else:
            out.append((vals[0], vals[1], vals[0]))
    return out, bad


def build_pairs(
    sources: Iterable[PairSource | tuple[str, Kind]],
    *,
    strict: bool = False,
    settings: storage.StorageSettings | None = None,
) -> PairBuild:
    """Read every source and build the deduplicated pairs table (:data:`PAIRS_SCHEMA`).

    Lenient by default: bad rows are skipped and listed in ``PairBuild.bad_rows``;
    ``strict=True`` raises :class:`BadRowsError` after reading all sources, so the error
    lists every bad row at once.
    """
    parts: list[tuple[str, Kind, list[tuple[str, str, str]]]] = []
    bad: list[BadRow] = []
    rows_read = 0
    for src in sources:
        src = src if isinstance(src, PairSource) else PairSource(*src)
        records, unparsed = read_records(src.uri, src.kind, settings)
        rows_read += len(records) + len(unparsed)
        name = _file_name(src.uri)
        triples, invalid = pairs_from_records(records, src.kind, name)
        bad.extend(unparsed)
        bad.extend(invalid)
        parts.append((name, src.kind, triples))
    bad.sort(key=lambda b: (b.file, b.line))
    if strict and bad:
        raise BadRowsError(bad)
    table, stats = _assemble(parts)
    stats.update(rows_read=rows_read, bad_rows=len(bad))
    return PairBuild(table, bad, stats)


def pairs_table(
    records: Iterable[Mapping[str, Any]], kind: Kind, source: str = "<records>", *, strict: bool = False
) -> PairBuild:
    """:func:`build_pairs` for in-memory records (e.g. :func:`umair.sample.vocab.name_table`)."""
    triples, bad = pairs_from_records(records, kind, source)
    if strict and bad:
        raise BadRowsError(bad)
    table, stats = _assemble([(source, kind, triples)])
    stats.update(bad_rows=len(bad))
    return PairBuild(table, bad, stats)


def _assemble(parts: Sequence[tuple[str, Kind, list[tuple[str, str, str]]]]) -> tuple[pa.Table, dict[str, int]]:
    seen: set[tuple[str, str]] = set()
    cols: dict[str, list[str]] = {n: [] for n in PAIRS_SCHEMA.names}
    dup = same = 0
    for source, kind, triples in parts:
        for anchor, positive, group in triples:
            if anchor == positive:
                same += 1
                continue
            if (anchor, positive) in seen:
                dup += 1
                continue
            seen.add((anchor, positive))
            cols["anchor"].append(anchor)
            cols["positive"].append(positive)
            cols["perspective"].append(PERSPECTIVES[kind])
            cols["source"].append(source)
            cols["group"].append(group)
    table = pa.table(cols, schema=PAIRS_SCHEMA)
    return table, {"pairs": table.num_rows, "duplicates_dropped": dup, "identical_dropped": same}


# ---------------------------------------------------------------------------------------
# Pairs tables on storage


def validate_pairs(table: pa.Table, file: str = "<pairs>") -> pa.Table:
    """Check a pairs table: string ``anchor``/``positive`` without nulls or empty strings.

    ``perspective``, ``source`` and ``group`` are optional (filled with "unknown", "" and
    the anchor when absent). Returns the table in :data:`PAIRS_SCHEMA` column order.
    """
    n = table.num_rows
    cols = {}
    for name in PAIRS_SCHEMA.names:
        if name not in table.column_names:
            if name in ("anchor", "positive"):
                raise ContractError(
                    file, name, "a string column", f"no such column (columns: {', '.join(table.column_names)})"
                )
            fill = {"perspective": "unknown", "source": ""}.get(name)
            cols[name] = (
                table.column("anchor").cast(pa.string()) if name == "group" else pa.array([fill] * n, pa.string())
            )
            continue
        col = table.column(name)
        t = col.type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t)):
            raise ContractError(file, name, "string", str(t))
        col = col.cast(pa.string())
        if name in ("anchor", "positive"):
            bad = pc.or_(pc.is_null(col), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0))
            idx = pc.index(pc.fill_null(bad, True), True).as_py()
            if idx is not None and idx >= 0:
                raise ContractError(file, name, "non-empty text", "null or empty", idx)
        cols[name] = col
    return pa.table(cols, schema=PAIRS_SCHEMA)


def write_pairs(table: pa.Table, uri: str, settings: storage.StorageSettings | None = None) -> None:
    storage.write_parquet(validate_pairs(table, uri), uri, settings)


def read_pairs(uri: str, settings: storage.StorageSettings | None = None) -> pa.Table:
    return validate_pairs(storage.read_parquet(uri, settings), uri)
