"""Data contracts: the Arrow schemas every table must follow, and one validating reader.

A contract names the columns a table must have (*required*), the columns it may have
with a fixed meaning (*optional typed columns*: checked and cast to their canonical type
when present, simply absent otherwise) and rules on values. Any other column is allowed
when it is a string, integer, float, bool or list (categoricals such as ``artist``).

Tables (``required``; *optional typed columns*):

- ``illustrations``: illust_id int64 (unique), image_uri string (NULL allowed: an item
  without an image is normal); *tags* list<string>, *created_at* timestamp[us, UTC]
  (nulls allowed), *width*, *height*, *page_count* int32 (positive where not null).
- ``users``: user_id int64 (unique); *interest_tags* list<string>.
- ``interactions``: user_id, illust_id int64, ts timestamp[us, UTC], label int8 in
  {0, 1} (1 = bookmarked / liked, 0 = shown, not); no nulls.
- ``item_features``: illust_id int64 (unique); the vector columns of
  :mod:`umair.modalities` (e_SEM ``sem``, e_STY ``sty``, e_TSEM ``tsem``:
  fixed_size_list<float16|float32>[d]; NULL where the item lacks that modality, e.g. no
  image); encoder versions and dims live in the file metadata.
- ``extraction_errors``: illust_id, uri, stage, error.

:func:`read_table` reads one table, normalises compatible types (int32 ids become
int64, any timestamp unit becomes microseconds UTC, large strings become strings) and
raises :class:`ContractError` naming the file, the column, the first offending row, what
was expected and what was found. :func:`check_interactions` adds the rules that need
several tables: unknown user or illustration ids are always errors; the rule "an
interaction is not before the item's created_at" is a :class:`Checks` setting
(``error`` / ``warn`` / ``off``) because real logs break it, and its count comes back in
a :class:`CheckReport`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from umair import modalities as registry
from umair import storage
from umair.config import Settings
from umair.errors import UmairError

log = logging.getLogger("umair")

TIMESTAMP = pa.timestamp("us", tz="UTC")
TAGS = pa.list_(pa.string())


class ContractError(UmairError, ValueError):
    """A table broke its contract. Attributes say where and what was expected."""

    def __init__(self, file: str, column: str | None, expected: str, found: str, row: int | None = None):
        self.file, self.column, self.expected, self.found, self.row = file, column, expected, found, row
        where = file
        if column is not None:
            where += f": column '{column}'"
        if row is not None:
            where += f" (row {row})"
        super().__init__(f"{where}: expected {expected}, found {found}")


@dataclass(frozen=True)
class Contract:
    """Required columns with their canonical types, optional typed columns (checked and
    conformed when present, absent otherwise), plus rules on values."""

    name: str
    required: pa.Schema
    id_columns: tuple[str, ...] = ()  # each value unique and non-null
    not_null: tuple[str, ...] = ()
    optional: pa.Schema = pa.schema([])
    positive: tuple[str, ...] = ()  # integer columns whose non-null values must be >= 1
    # Extra columns are allowed when their type is one of these (categoricals, numbers).
    extra_types: tuple[str, ...] = ("string", "integer", "floating", "boolean", "list")
    # Vector modality columns (umair.modalities: e_SEM, e_STY, e_TSEM, ...) are allowed and checked.
    vector_modalities: bool = False

    @property
    def vector_columns(self) -> tuple[str, ...]:
        return registry.names() if self.vector_modalities else ()


ILLUSTRATIONS = Contract(
    "illustrations",
    pa.schema([("illust_id", pa.int64()), ("image_uri", pa.string())]),
    id_columns=("illust_id",),
    optional=pa.schema(
        [
            ("tags", TAGS),
            ("created_at", TIMESTAMP),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("page_count", pa.int32()),
        ]
    ),
    positive=("width", "height", "page_count"),
)

USERS = Contract(
    "users",
    pa.schema([("user_id", pa.int64())]),
    id_columns=("user_id",),
    optional=pa.schema([("interest_tags", TAGS)]),
)

INTERACTIONS = Contract(
    "interactions",
    pa.schema([("user_id", pa.int64()), ("illust_id", pa.int64()), ("ts", TIMESTAMP), ("label", pa.int8())]),
    not_null=("user_id", "illust_id", "ts", "label"),
)

ITEM_FEATURES = Contract(
    "item_features",
    pa.schema([("illust_id", pa.int64())]),
    id_columns=("illust_id",),
    vector_modalities=True,
)

EXTRACTION_ERRORS = Contract(
    "extraction_errors",
    pa.schema([("illust_id", pa.int64()), ("uri", pa.string()), ("stage", pa.string()), ("error", pa.string())]),
    not_null=("uri", "stage", "error"),
)

CONTRACTS: dict[str, Contract] = {
    c.name: c for c in (ILLUSTRATIONS, USERS, INTERACTIONS, ITEM_FEATURES, EXTRACTION_ERRORS)
}


def _type_name(t: pa.DataType) -> str:
    """Readable type names: list<string>, not list<item: string> / list<element: ...>."""
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list<{_type_name(t.value_type)}>"
    if pa.types.is_fixed_size_list(t):
        return f"fixed_size_list<{_type_name(t.value_type)}>[{t.list_size}]"
    return str(t)


def _is_kind(t: pa.DataType, kind: str) -> bool:
    return {
        "string": pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t),
        "integer": pa.types.is_integer(t),
        "floating": pa.types.is_floating(t),
        "boolean": pa.types.is_boolean(t),
        "list": pa.types.is_list(t) or pa.types.is_large_list(t),
    }[kind]


def _conform(arr: pa.ChunkedArray, want: pa.DataType, file: str, column: str) -> pa.ChunkedArray:
    """Cast ``arr`` to ``want`` when that loses nothing; otherwise raise ContractError."""
    have = arr.type
    if have == want:
        return arr
    ok = False
    if pa.types.is_integer(want):
        ok = pa.types.is_integer(have)
    elif pa.types.is_timestamp(want):
        ok = pa.types.is_timestamp(have) and have.tz in (None, "UTC", "+00:00", "Etc/UTC")
    elif pa.types.is_string(want):
        ok = pa.types.is_large_string(have) or pa.types.is_dictionary(have)
    elif pa.types.is_list(want):
        ok = (pa.types.is_list(have) or pa.types.is_large_list(have)) and _is_kind(have.value_type, "string")
    if not ok:
        raise ContractError(file, column, _type_name(want), _type_name(have))
    try:
        if pa.types.is_timestamp(want) and have.tz is None:
            arr = pc.assume_timezone(arr, "UTC")
        return arr.cast(want, safe=True)
    except pa.ArrowInvalid as err:
        raise ContractError(
            file, column, _type_name(want), f"{_type_name(have)} values that do not fit ({err})"
        ) from err


def _first_true(mask: pa.ChunkedArray | pa.Array) -> int | None:
    idx = pc.index(pc.fill_null(mask, False), True).as_py()
    return None if idx is None or idx < 0 else idx


def _first_non_finite(column: pa.ChunkedArray, width: int) -> int | None:
    """Row of the first vector holding a NaN or an infinity, or None."""
    offset = 0
    for chunk in column.chunks:
        values = chunk.flatten().to_numpy(zero_copy_only=False)
        if len(values):
            bad = ~np.isfinite(values.reshape(len(chunk), width)).all(axis=1)
            if bad.any():
                return offset + int(np.argmax(bad))
        offset += len(chunk)
    return None


def _check_vectors(table: pa.Table, contract: Contract, file: str) -> None:
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    for name in contract.vector_columns:
        if name not in table.column_names:
            continue  # a feature table may omit a modality; consumers check what they need
        t = table.schema.field(name).type
        if not (pa.types.is_fixed_size_list(t) and t.value_type in (pa.float16(), pa.float32())):
            raise ContractError(file, name, "fixed_size_list<float16|float32>", _type_name(t))
        declared = meta.get(f"umair.{name}.dim")
        if declared is not None and int(declared) != t.list_size:
            raise ContractError(file, name, f"dimension {declared} (file metadata)", f"dimension {t.list_size}")
        # NULL = the modality is absent for that item (e.g. no image: no e_SEM / e_STY); a
        # vector that is there must be finite.
        column, present = table.column(name), None
        if column.null_count:
            present = np.flatnonzero(column.is_valid().to_numpy(zero_copy_only=False))
            column = column.filter(column.is_valid())
        row = _first_non_finite(column, t.list_size)
        if row is not None:
            row = int(present[row]) if present is not None else row
            ident = f"illust_id {table.column('illust_id')[row].as_py()}: " if "illust_id" in table.column_names else ""
            raise ContractError(file, name, "finite values in every vector", f"{ident}NaN or infinity", row)


def validate(table: pa.Table, kind: str, file: str = "<table>") -> pa.Table:
    """Check ``table`` against the contract named ``kind``; return it in canonical types."""
    contract = CONTRACTS[kind]
    columns = {}
    for f in contract.required:
        if f.name not in table.column_names:
            raise ContractError(
                file,
                f.name,
                f"a column of type {_type_name(f.type)}",
                f"no such column (columns: {', '.join(table.column_names)})",
            )
        columns[f.name] = _conform(table.column(f.name), f.type, file, f.name)
    for f in contract.optional:
        if f.name in table.column_names:
            columns[f.name] = _conform(table.column(f.name), f.type, file, f.name)
    for name in table.column_names:
        if name in columns:
            continue
        t = table.schema.field(name).type
        if name in contract.vector_columns:
            columns[name] = table.column(name)
        elif any(_is_kind(t, k) for k in contract.extra_types):
            columns[name] = table.column(name)
        else:
            raise ContractError(
                file, name, "an extra column of type string, integer, float, bool or list", _type_name(t)
            )
    out = pa.table(columns, schema=None).replace_schema_metadata(table.schema.metadata)
    for name in contract.id_columns + contract.not_null:
        row = _first_true(out.column(name).is_null())
        if row is not None:
            raise ContractError(file, name, "no nulls", "null", row)
    for name in contract.id_columns:
        ids = out.column(name).to_numpy()
        uniq, first, counts = np.unique(ids, return_index=True, return_counts=True)
        if len(uniq) != len(ids):
            dup = uniq[counts > 1][0]
            rows = np.flatnonzero(ids == dup)
            raise ContractError(file, name, "unique ids", f"id {dup} repeated", int(rows[1]))
    if kind == "interactions":
        bad = pc.invert(pc.is_in(out.column("label"), value_set=pa.array([0, 1], pa.int8())))
        row = _first_true(bad)
        if row is not None:
            raise ContractError(file, "label", "labels in {0, 1}", f"{out.column('label')[row].as_py()}", row)
    for name in contract.positive:
        if name in out.column_names:
            row = _first_true(pc.less(out.column(name), 1))
            if row is not None:
                raise ContractError(file, name, "a positive integer or null", str(out.column(name)[row].as_py()), row)
    _check_vectors(out, contract, file)
    return out


def read_table(uri: str, kind: str, settings: storage.StorageSettings | None = None) -> pa.Table:
    """Read the parquet at ``uri`` and validate it as ``kind`` (see :data:`CONTRACTS`)."""
    if kind not in CONTRACTS:
        raise KeyError(f"unknown table kind {kind!r}; expected one of {sorted(CONTRACTS)}")
    return validate(storage.read_parquet(uri, settings), kind, uri)


class Checks(Settings):
    """How :func:`check_interactions` treats a rule that real logs may break.

    before_created_at: an interaction whose ``ts`` is before its illustration's
    ``created_at`` (a catalogue re-dated after import, a clock skew). ``error`` raises
    :class:`ContractError`; ``warn`` (default) counts the rows, logs one warning on the
    ``umair`` logger and goes on; ``off`` skips the rule."""

    before_created_at: Literal["error", "warn", "off"] = "warn"


@dataclass(frozen=True)
class CheckReport:
    """What :func:`check_interactions` found that was not an error.

    before_created_at: rows whose ts is before the item's created_at (0 when the
    column is absent or the rule is off); ``before_created_at_example`` describes the
    first such row ("row 3: user 7, illust_id 12, ts ... before created_at ...")."""

    before_created_at: int = 0
    before_created_at_example: str | None = None
    file: str = "<interactions>"

    def lines(self) -> list[str]:
        """Human-readable warnings, one per broken rule (empty when none)."""
        out = []
        if self.before_created_at:
            out.append(
                f"{self.file}: {self.before_created_at} interaction(s) before the illustration's "
                f"created_at (checks.before_created_at=warn); first: {self.before_created_at_example}"
            )
        return out


def _before_created_at(interactions: pa.Table, illustrations: pa.Table) -> tuple[int, int | None, str]:
    """(count, first row, its description) of interactions whose ts is before their
    illustration's created_at; items with a null created_at, or a table without the
    column, never count. Assumes every illust_id is known (checked before)."""
    if "created_at" not in illustrations.column_names or interactions.num_rows == 0:
        return 0, None, ""
    ids = illustrations.column("illust_id").to_numpy()
    created_col = illustrations.column("created_at")
    known = ~created_col.is_null().to_numpy(zero_copy_only=False).astype(bool)
    created = pc.fill_null(created_col.cast(pa.int64()), 0).to_numpy()
    order = np.argsort(ids)
    item_row = order[np.searchsorted(ids[order], interactions.column("illust_id").to_numpy())]
    ts = interactions.column("ts").cast(pa.int64()).to_numpy()
    early = np.flatnonzero(known[item_row] & (ts < created[item_row]))
    if not len(early):
        return 0, None, ""
    row = int(early[0])
    detail = (
        f"user_id {interactions.column('user_id')[row].as_py()}, "
        f"illust_id {interactions.column('illust_id')[row].as_py()}, "
        f"ts {interactions.column('ts')[row].as_py()} before created_at "
        f"{created_col[int(item_row[row])].as_py()}"
    )
    return len(early), row, detail


def check_interactions(
    interactions: pa.Table,
    users: pa.Table,
    illustrations: pa.Table,
    file: str = "<interactions>",
    checks: Checks | None = None,
) -> CheckReport:
    """Cross-table rules on validated tables: every interaction names a known user and
    illustration (always an error), and, as ``checks.before_created_at`` says, nobody
    interacts with an illustration before its ``created_at`` (skipped for items without
    one). Returns the counts of rows that broke a rule set to ``warn``."""
    checks = checks or Checks()
    for col, ref, ref_col, what in (
        ("user_id", users, "user_id", "users"),
        ("illust_id", illustrations, "illust_id", "illustrations"),
    ):
        unknown = pc.invert(pc.is_in(interactions.column(col), value_set=ref.column(ref_col).combine_chunks()))
        row = _first_true(unknown)
        if row is not None:
            raise ContractError(
                file, col, f"an id present in {what}", f"unknown id {interactions.column(col)[row].as_py()}", row
            )
    if checks.before_created_at == "off":
        return CheckReport(file=file)
    count, row, detail = _before_created_at(interactions, illustrations)
    if count and checks.before_created_at == "error":
        raise ContractError(
            file,
            "ts",
            "a time at or after the illustration's created_at (checks.before_created_at: error; "
            "warn or off accept logs that break this)",
            f"{count} such row(s), the first: {detail}",
            row,
        )
    example = f"row {row}: {detail}" if count else None
    report = CheckReport(before_created_at=count, before_created_at_example=example, file=file)
    for line in report.lines():
        log.warning(line)
    return report
