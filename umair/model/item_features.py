"""The item-features table (the extraction output) as the model reads it: ids, vector
widths and ``umair.*`` metadata without reading the vectors (:class:`FeaturesInfo`),
width checks against the model config, the vectors aligned to item rows and
standardised with training-item statistics, and interactions mapped to rows.

A vector may be NULL: the item lacks that modality (no image: no e_SEM / e_STY). Such rows
hold zeros after standardisation and ``present[m]`` is false (:class:`ItemTable`); the
statistics are fitted over present rows only (:func:`vector_matrix`)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from umair import contracts, storage
from umair import modalities as registry
from umair.errors import FeatureError
from umair.model.features import FeatureSpace, ItemTable, VectorStats
from umair.model.interactions import rows_of


@dataclass(frozen=True)
class FeaturesInfo:
    """What the driver needs of an item-features table without reading its vectors."""

    uri: str
    illust_ids: np.ndarray  # row order of the file(s): item_row r <-> illust_ids[r]
    dims: dict[str, int]  # modality -> vector width, for the modalities present
    metadata: dict[str, str]  # the umair.* file metadata

    @property
    def fingerprint(self) -> str:
        """Changes when the rows or their order change."""
        return ids_fingerprint(self.illust_ids)

    def encoder_versions(self) -> dict[str, str]:
        """``umair.<name>.encoder`` / ``*.version`` metadata entries, keyed without the prefix."""
        return {
            k[len("umair.") :]: v
            for k, v in self.metadata.items()
            if k.endswith((".encoder", ".version", "encoder_version"))
        }


def vector_matrix(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A fixed-size-list column [R] as ``(x, present)``: ``x`` [R, d] (float16/32 as stored;
    zeros where the vector is NULL) and ``present`` [R] bool."""
    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    d = col.type.list_size
    present = np.ones(len(col), bool) if not col.null_count else col.is_valid().to_numpy(zero_copy_only=False)
    if present.all():
        return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), d), present
    x = np.zeros((len(col), d), col.type.value_type.to_pandas_dtype())
    x[present] = col.filter(col.is_valid()).flatten().to_numpy(zero_copy_only=False).reshape(-1, d)
    return x, present


def modality_coverage(items: ItemTable, item_rows: np.ndarray | None = None) -> dict[str, int]:
    """``{"items": n, m: items with modality m present, ...}`` over the distinct ``item_rows``
    (default: every row of ``items``), for jobs to report how many items lack e.g. an image."""
    rows = np.arange(len(items.illust_ids)) if item_rows is None else np.unique(np.asarray(item_rows, np.int64))
    out = {"items": int(len(rows))}
    out.update({m: int(items.presence(m)[rows].sum()) for m in items.vectors})
    return out


def ids_fingerprint(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).hexdigest()[:16]


def _umair_metadata(schema: pa.Schema) -> dict[str, str]:
    meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    return {k: v for k, v in meta.items() if k.startswith("umair.")}


def _schema_of(uri: str, settings: storage.StorageSettings | None) -> pa.Schema:
    import pyarrow.dataset as pads

    fs, path = storage.resolve(uri, settings)
    with storage.storage_errors(uri, "read", settings):
        return pads.dataset(path, filesystem=fs, format="parquet").schema


def features_info(table: pa.Table, uri: str) -> FeaturesInfo:
    """:class:`FeaturesInfo` of an item-features table already in memory (validated here)."""
    table = contracts.validate(table, "item_features", uri)
    dims = {m: table.schema.field(m).type.list_size for m in registry.names() if m in table.column_names}
    return FeaturesInfo(uri, table.column("illust_id").to_numpy().astype(np.int64), dims, _umair_metadata(table.schema))


def inspect_item_features(uri: str, settings: storage.StorageSettings | None = None) -> FeaturesInfo:
    """Check an item-features table's contract (ids, vector types, dims vs metadata)
    reading only its ``illust_id`` column and schema."""
    schema = _schema_of(uri, settings)
    contracts.validate(schema.empty_table(), "item_features", uri)  # vector types, dims vs metadata
    ids = contracts.validate(storage.read_parquet(uri, settings, columns=["illust_id"]), "item_features", uri)
    dims = {m: schema.field(m).type.list_size for m in registry.names() if m in schema.names}
    return FeaturesInfo(uri, ids.column("illust_id").to_numpy().astype(np.int64), dims, _umair_metadata(schema))


def check_dims(info: FeaturesInfo, wanted: Mapping[str, int | None]) -> dict[str, int]:
    """The width of each wanted modality (``wanted[m]``: the width the model config sets,
    or None to take the file's). Raises :class:`FeatureError` for a missing column or a
    width that disagrees with the config."""
    dims: dict[str, int] = {}
    for m, want in wanted.items():
        if m not in info.dims:
            raise FeatureError(
                f"{info.uri}: no column '{m}' in the item features (columns: {', '.join(info.dims) or 'none'}), "
                f"but the model uses e_{m.upper()}; extract it or leave it out of model.vectors"
            )
        have = info.dims[m]
        if want is not None and want != have:
            declared = info.metadata.get(f"umair.{m}.dim")
            source = f"file metadata umair.{m}.dim={declared}" if declared is not None else "the column type"
            raise FeatureError(
                f"{info.uri}: column '{m}' holds {have}-d vectors ({source}), but the model config sets vectors.{m}={want}"
            )
        dims[m] = have
    return dims


def build_item_table(
    features: pa.Table,
    illustrations: pa.Table,
    space: FeatureSpace,
    modalities: Sequence[str],
    expected_fingerprint: str | None = None,
    source: str = "<item_features>",
    dtype: np.dtype | type = np.float16,
) -> ItemTable:
    """Align a validated item-features table (contract ``item_features``) to item rows:
    its own row order. ``expected_fingerprint`` (from :class:`FeaturesInfo`) guards
    against the file changing between the driver's check and a worker's load.

    The e_SEM / e_STY / e_TSEM vectors are kept as ``dtype`` (default float16: half the
    memory of float32; the model reads them as float32 per batch,
    :meth:`umair.training.lookup.Lookup.item_vectors`). Standardisation is computed in
    float32 over blocks of :data:`BLOCK_ROWS` rows (:func:`standardised`), so no float32
    copy of a whole table is ever held."""
    ids = features.column("illust_id").to_numpy().astype(np.int64)
    if expected_fingerprint is not None and ids_fingerprint(ids) != expected_fingerprint:
        raise FeatureError(
            f"{source}: the item features changed since this run was prepared (rows or their order differ)"
        )
    vectors: dict[str, np.ndarray] = {}
    present: dict[str, np.ndarray] = {}
    for m in modalities:
        x, present[m] = vector_matrix(features.column(m))
        d = x.shape[1]
        stats = space.vector_stats.get(m)
        if stats is not None and len(stats.mean) != d:
            raise FeatureError(
                f"{source}: column '{m}' holds {d}-d vectors, but the feature space was fitted on {len(stats.mean)}-d ones"
            )
        vectors[m] = standardised(x, present[m], stats, dtype, f"{source}: column '{m}'")
        del x
    meta = _umair_metadata(features.schema)
    return ItemTable(ids, space.encode_items(illustrations, ids), vectors, meta, present)


BLOCK_ROWS = 16384
"""Rows standardised at a time by :func:`standardised` (float32 scratch of BLOCK_ROWS × d)."""


def standardised(
    x: np.ndarray, present: np.ndarray, stats: VectorStats | None, dtype: np.dtype | type, source: str = "<vectors>"
) -> np.ndarray:
    """``(x - mean) / std`` (``stats``; None: ``x`` as it is) as a new ``dtype`` array [R, d],
    computed in float32 block by block; rows where ``present`` is false hold zeros (an
    absent modality, masked by the model). A value that does not fit ``dtype`` (float16
    tops out at 65504) is a :class:`FeatureError` naming ``source``."""
    out = np.empty(x.shape, dtype)
    for s in range(0, len(x), BLOCK_ROWS):
        block = x[s : s + BLOCK_ROWS].astype(np.float32)
        if stats is not None:
            block -= stats.mean
            block /= stats.std
        block[~present[s : s + BLOCK_ROWS]] = 0
        out[s : s + BLOCK_ROWS] = block
        if not np.isfinite(out[s : s + BLOCK_ROWS]).all():
            row = s + int(np.argmax(~np.isfinite(out[s : s + BLOCK_ROWS]).all(axis=1)))
            raise FeatureError(
                f"{source}: row {row} does not fit {np.dtype(dtype).name} (|value| > "
                f"{float(np.finfo(dtype).max):g} or not finite); standardise the vectors or keep them as float32"
            )
    return out


def _stats_of_batches(
    batches: Iterable[pa.RecordBatch], modalities: Sequence[str], source: str, n_wanted: int
) -> dict[str, VectorStats]:
    """Per-dimension mean / std of each modality over the rows of ``batches`` where it is
    present (float64 sums)."""
    sums: dict[str, np.ndarray] = {}
    squares: dict[str, np.ndarray] = {}
    n = 0
    counts = dict.fromkeys(modalities, 0)
    for batch in batches:
        if batch.num_rows == 0:
            continue
        n += batch.num_rows
        for m in modalities:
            x, present = vector_matrix(batch.column(m))
            x = x.astype(np.float64)
            counts[m] += int(present.sum())
            finite = np.isfinite(x).all(axis=1)
            if not finite.all():
                row = int(np.argmax(~finite))
                ident = (
                    f"illust_id {batch.column('illust_id')[row].as_py()}"
                    if "illust_id" in batch.schema.names
                    else "a row"
                )
                raise FeatureError(f"{source}: column '{m}': {ident} holds NaN or infinite values; re-extract it")
            sums[m] = sums.get(m, 0.0) + x.sum(axis=0)
            squares[m] = squares.get(m, 0.0) + (x * x).sum(axis=0)
    if n == 0:
        raise FeatureError(f"{source}: none of the {n_wanted} training-window illustrations has item features")
    stats = {}
    for m in modalities:
        if counts[m] == 0:
            raise FeatureError(
                f"{source}: column '{m}' is NULL for all {n} training-window illustrations with item features "
                f"(none has e_{m.upper()}); extract it or leave it out of model.vectors"
            )
        mean = sums[m] / counts[m]
        std = np.sqrt(np.maximum(squares[m] / counts[m] - mean * mean, 0.0))
        std = np.where(std > 1e-6 * max(float(np.abs(mean).max()), 1.0), std, 1.0)
        stats[m] = VectorStats(mean.astype(np.float32), std.astype(np.float32))
    return stats


def fit_vector_stats(
    uri: str,
    item_ids: np.ndarray,
    modalities: Sequence[str],
    settings: storage.StorageSettings | None = None,
    batch_rows: int = 8192,
) -> dict[str, VectorStats]:
    """Mean / std per dimension of each modality over the items ``item_ids`` (the
    training window's), streaming a parquet file or directory in batches (bounded memory)."""
    import pyarrow.dataset as pads

    if not modalities:
        return {}
    fs, path = storage.resolve(uri, settings)
    wanted = pa.array(np.unique(np.asarray(item_ids, np.int64)), pa.int64())
    with storage.storage_errors(uri, "read", settings):
        dataset = pads.dataset(path, filesystem=fs, format="parquet")
        scanner = dataset.scanner(
            columns=["illust_id", *modalities], filter=pads.field("illust_id").isin(wanted), batch_size=batch_rows
        )
        return _stats_of_batches(scanner.to_batches(), modalities, uri, len(wanted))


def vector_stats_of(
    table: pa.Table, item_ids: np.ndarray, modalities: Sequence[str], source: str = "<item_features>"
) -> dict[str, VectorStats]:
    """:func:`fit_vector_stats` for a table already in memory."""
    if not modalities:
        return {}
    wanted = pa.array(np.unique(np.asarray(item_ids, np.int64)), pa.int64())
    rows = table.filter(pc.is_in(table.column("illust_id"), value_set=wanted)).select(["illust_id", *modalities])
    return _stats_of_batches(rows.to_batches(), modalities, source, len(wanted))


def check_item_coverage(
    interactions: pa.Table, item_ids: np.ndarray, features_uri: str, source: str = "<interactions>"
) -> None:
    """:class:`FeatureError` when interactions reference illustrations without item
    features, naming how many (and how many interactions) with the first one as example."""
    ids = interactions.column("illust_id").to_numpy()
    missing = rows_of(np.asarray(item_ids, np.int64), ids) < 0
    if missing.any():
        raise FeatureError(
            f"{features_uri}: {len(np.unique(ids[missing]))} illustration(s) referenced by {int(missing.sum())} interaction(s) "
            f"in {source} have no item features (e.g. illust_id {int(ids[missing][0])}); run the extraction over them first"
        )


def attach_rows(
    interactions: pa.Table,
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    features_uri: str,
    source: str = "<interactions>",
) -> pa.Table:
    """``user_row``, ``item_row`` (int64 rows of the user / item tables), ``ts`` (int64, the
    table's own time unit: what the user history is cut at) and ``label`` (float32) for
    each interaction. Every referenced illustration must have item
    features: otherwise :class:`FeatureError` says how many are missing, with an example."""
    check_item_coverage(interactions, item_ids, features_uri, source)
    item_rows = rows_of(np.asarray(item_ids, np.int64), interactions.column("illust_id").to_numpy())
    user_rows = rows_of(np.asarray(user_ids, np.int64), interactions.column("user_id").to_numpy())
    if (user_rows < 0).any():
        bad = interactions.column("user_id").to_numpy()[user_rows < 0]
        raise FeatureError(
            f"{source}: {len(np.unique(bad))} user(s) are not in the users table (e.g. user_id {int(bad[0])})"
        )
    return pa.table(
        {
            "user_row": pa.array(user_rows, pa.int64()),
            "item_row": pa.array(item_rows, pa.int64()),
            "ts": interactions.column("ts").cast(pa.int64()).combine_chunks(),
            "label": pa.array(interactions.column("label").to_numpy().astype(np.float32), pa.float32()),
        }
    )
