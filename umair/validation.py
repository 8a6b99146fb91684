"""``umair validate``: check a site's tables against the data contracts and summarise them.

Two forms, one report:

- :func:`validate_tables` for any catalogue (local paths or ``s3://`` URIs):
  illustrations, users, interactions and optionally the item-features table (the
  e_SEM / e_STY / e_TSEM vectors of extraction). Only the contract's required columns
  must exist (see :mod:`umair.contracts`); optional typed columns are checked when
  present.
- :func:`validate_world` for a sample world (``world.json`` manifest, truth tables,
  images under ``WORLD/images/``).

Both return a :class:`ValidationReport` whose :meth:`~ValidationReport.lines` is what
the command prints: per table rows and distinct ids, the interactions' time range and
label rate, items without an image, rule violations allowed by
:class:`umair.contracts.Checks` (counted, with the first example), and for item
features the modalities with their widths and the interacted items that have no
feature row. A broken contract raises :class:`umair.contracts.ContractError` (the
command exits 2).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from umair import contracts, storage
from umair.contracts import Checks

MAX_EXAMPLES = 5  # missing image URIs listed by name


@dataclass(frozen=True)
class ValidationReport:
    """What validation found: ``summary`` (section -> key -> value, JSON-friendly) and
    ``warnings`` (rules broken where the setting allows it, items without features...)."""

    title: str
    summary: dict[str, dict[str, Any]]
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The printed report: ``TITLE: valid``, then one indented line per count, then
        the warnings."""
        out = [f"{self.title}: valid" + (f" ({len(self.warnings)} warning(s))" if self.warnings else "")]
        for section, values in self.summary.items():
            out.append(f"  {section}")
            width = max((len(k) for k in values), default=0)
            for k, v in values.items():
                text = json.dumps(v, ensure_ascii=False, default=str) if isinstance(v, (dict, list)) else v
                out.append(f"    {k:<{width}}  {text}")
        out += [f"  warning: {w}" for w in self.warnings]
        return out


def _distinct(table: pa.Table, column: str) -> int:
    return len(pc.unique(table.column(column)))


def _time_range(ts: pa.ChunkedArray) -> list[str] | None:
    if len(ts) == 0:
        return None
    return [pc.min(ts).as_py().isoformat(), pc.max(ts).as_py().isoformat()]


def _missing_images(
    uris: list[str | None], settings: storage.StorageSettings | None, workers: int = 16
) -> tuple[int, list[str]]:
    """(how many non-null URIs do not exist, the first :data:`MAX_EXAMPLES` of them)."""
    present = [u for u in uris if u is not None]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = list(pool.map(lambda u: storage.exists(u, settings), present))
    missing = [u for u, ok in zip(present, found) if not ok]
    return len(missing), missing[:MAX_EXAMPLES]


def _illustrations_summary(
    ill: pa.Table, check_images: bool, settings: storage.StorageSettings | None
) -> dict[str, Any]:
    optional = [f.name for f in contracts.ILLUSTRATIONS.optional if f.name in ill.column_names]
    out: dict[str, Any] = {
        "rows": ill.num_rows,
        "distinct_illust_ids": _distinct(ill, "illust_id"),
        "optional_columns": optional,
        "without_image_uri": ill.column("image_uri").null_count,
    }
    if check_images:
        n_missing, first = _missing_images(ill.column("image_uri").to_pylist(), settings)
        out["image_uris_checked"] = ill.num_rows - ill.column("image_uri").null_count
        out["image_uris_missing"] = n_missing
        if first:
            out["first_missing"] = first
    return out


def _users_summary(users: pa.Table) -> dict[str, Any]:
    return {
        "rows": users.num_rows,
        "distinct_user_ids": _distinct(users, "user_id"),
        "optional_columns": [f.name for f in contracts.USERS.optional if f.name in users.column_names],
    }


def _interactions_summary(inter: pa.Table, report: contracts.CheckReport, checks: Checks) -> dict[str, Any]:
    labels = inter.column("label").to_numpy()
    return {
        "rows": inter.num_rows,
        "distinct_user_ids": _distinct(inter, "user_id"),
        "distinct_illust_ids": _distinct(inter, "illust_id"),
        "time_range": _time_range(inter.column("ts")),
        "label_rate": round(float(labels.mean()), 4) if len(labels) else None,
        "unknown_user_ids": 0,
        "unknown_illust_ids": 0,
        "before_created_at": "not checked (off)" if checks.before_created_at == "off" else report.before_created_at,
    }


def _features_summary(features: pa.Table, inter: pa.Table) -> tuple[dict[str, Any], list[str]]:
    """Rows, modalities (name -> width, rows holding a vector) and interacted items
    without a feature row."""
    modalities = {}
    for name in contracts.ITEM_FEATURES.vector_columns:
        if name in features.column_names:
            t = features.schema.field(name).type
            modalities[name] = {"width": t.list_size, "rows": features.num_rows - features.column(name).null_count}
    used = pc.unique(inter.column("illust_id"))
    lacking = pc.invert(pc.is_in(used, value_set=features.column("illust_id").combine_chunks()))
    n_lacking = int(pc.sum(lacking).as_py() or 0)
    summary = {
        "rows": features.num_rows,
        "modalities": modalities,
        "interacted_items_without_features": n_lacking,
    }
    warnings = []
    if n_lacking:
        first = used.filter(lacking)[0].as_py()
        warnings.append(
            f"{n_lacking} of {len(used)} interacted illustrations have no item-features row (first: illust_id {first})"
        )
    return summary, warnings


def validate_tables(
    illustrations: str,
    users: str,
    interactions: str,
    item_features: str | None = None,
    checks: Checks | None = None,
    check_images: bool = False,
    settings: storage.StorageSettings | None = None,
) -> ValidationReport:
    """Read each table (local path or ``s3://``) against its contract, run the
    cross-table rules and summarise; raises :class:`~umair.contracts.ContractError` on
    the first broken contract. ``check_images`` asks storage whether every non-null
    image_uri exists (the first few missing are listed)."""
    checks = checks or Checks()
    ill = contracts.read_table(illustrations, "illustrations", settings)
    usr = contracts.read_table(users, "users", settings)
    inter = contracts.read_table(interactions, "interactions", settings)
    report = contracts.check_interactions(inter, usr, ill, interactions, checks)
    summary = {
        f"illustrations ({illustrations})": _illustrations_summary(ill, check_images, settings),
        f"users ({users})": _users_summary(usr),
        f"interactions ({interactions})": _interactions_summary(inter, report, checks),
    }
    warnings = report.lines()
    if check_images and summary[f"illustrations ({illustrations})"]["image_uris_missing"]:
        s = summary[f"illustrations ({illustrations})"]
        warnings.append(
            f"{illustrations}: {s['image_uris_missing']} image_uri(s) do not exist (first: {s['first_missing'][0]})"
        )
    if item_features is not None:
        feats = contracts.read_table(item_features, "item_features", settings)
        summary[f"item_features ({item_features})"], more = _features_summary(feats, inter)
        warnings += more
    title = ", ".join(str(x) for x in (illustrations, users, interactions, item_features) if x is not None)
    return ValidationReport(title=title, summary=summary, warnings=warnings)


def validate_world(
    root: str,
    settings: storage.StorageSettings | None = None,
    check_images: bool = True,
    checks: Checks | None = None,
) -> ValidationReport:
    """Load a sample world (:func:`umair.sample.world.load_world`) and report its
    :func:`~umair.sample.world.summarize` counts."""
    from umair.sample.world import load_world, summarize

    world = load_world(root, settings, check_images=check_images, checks=checks)
    warnings = world.checks.lines() if world.checks is not None else []
    return ValidationReport(title=root, summary={"world": summarize(world)}, warnings=warnings)
