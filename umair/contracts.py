"""Data contracts: the Arrow schemas every table must follow, and one validating reader.

Tables (see DESIGN.md, "Data contracts"):

- ``illustrations``: illust_id, image_uri, tags, created_at, width, height, page_count,
  plus optional categorical columns (artist, ...).
- ``users``: user_id, interest_tags, plus optional profile columns (gender, ...).
- ``interactions``: user_id, illust_id, ts, label (1 = bookmarked, 0 = shown, not).
- ``item_features``: illust_id, sem, sty, tsem (fixed-size float vectors: e_SEM,
  e_STY, e_TSEM); encoder versions and dims live in the file metadata.
- ``extraction_errors``: illust_id, uri, stage, error.

:func:`read_table` reads one table, normalises compatible types (int32 ids become
int64, any timestamp unit becomes microseconds UTC) and raises :class:`ContractError`
naming the file, the column, the first offending row and what was expected.
:func:`check_interactions` adds the checks that need several tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from umair import modalities as registry
from umair import storage
from umair.errors import UmairError

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
    """Required columns with their canonical types, plus rules on values."""

    name: str
    required: pa.Schema
    id_columns: tuple[str, ...] = ()  # each value unique and non-null
    not_null: tuple[str, ...] = ()
    # Extra columns are allowed when their type is one of these (categoricals, numbers).
    extra_types: tuple[str, ...] = ("string", "integer", "floating", "boolean", "list")
    # Vector modality columns (umair.modalities: e_SEM, e_STY, e_TSEM, ...) are allowed and checked.
    vector_modalities: bool = False

    @property
    def vector_columns(self) -> tuple[str, ...]:
        return registry.names() if self.vector_modalities else ()


ILLUSTRATIONS = Contract(
    "illustrations",
    pa.schema(
        [
            ("illust_id", pa.int64()),
            ("image_uri", pa.string()),
            ("tags", TAGS),
            ("created_at", TIMESTAMP),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("page_count", pa.int32()),
        ]
    ),
    id_columns=("illust_id",),
    not_null=("image_uri", "created_at"),
)

USERS = Contract(
    "users",
    pa.schema([("user_id", pa.int64()), ("interest_tags", TAGS)]),
    id_columns=("user_id",),
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
        nulls = table.column(name).is_null()
        row = _first_true(nulls)
        if row is not None:
            raise ContractError(file, name, "a vector in every row", "null", row)
        row = _first_non_finite(table.column(name), t.list_size)
        if row is not None:
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
    if kind == "illustrations":
        for name in ("width", "height", "page_count"):
            row = _first_true(pc.less(out.column(name), 1))
            if row is not None:
                raise ContractError(file, name, "a positive integer", str(out.column(name)[row].as_py()), row)
    _check_vectors(out, contract, file)
    return out


def read_table(uri: str, kind: str, settings: storage.StorageSettings | None = None) -> pa.Table:
    """Read the parquet at ``uri`` and validate it as ``kind`` (see :data:`CONTRACTS`)."""
    if kind not in CONTRACTS:
        raise KeyError(f"unknown table kind {kind!r}; expected one of {sorted(CONTRACTS)}")
    return validate(storage.read_parquet(uri, settings), kind, uri)


def check_interactions(
    interactions: pa.Table,
    users: pa.Table,
    illustrations: pa.Table,
    file: str = "<interactions>",
) -> None:
    """Cross-table rules: every interaction names a known user and illustration, and
    nobody bookmarks an illustration before it was published (ts >= created_at)."""
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
    ids = illustrations.column("illust_id").to_numpy()
    created = illustrations.column("created_at").cast(pa.int64()).to_numpy()
    order = np.argsort(ids)
    pos = np.searchsorted(ids[order], interactions.column("illust_id").to_numpy())
    item_created = created[order][pos]
    ts = interactions.column("ts").cast(pa.int64()).to_numpy()
    early = np.flatnonzero(ts < item_created)
    if len(early):
        row = int(early[0])
        raise ContractError(
            file,
            "ts",
            "a time at or after the illustration's created_at",
            f"{interactions.column('ts')[row].as_py()} before {illustrations.column('created_at')[int(order[pos[row]])].as_py()}",
            row,
        )
