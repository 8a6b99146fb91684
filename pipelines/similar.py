"""``umair similar ILLUST_ID --by style|semantic|text -k N``: nearest illustrations by
cosine in one feature space (e_STY, e_SEM or e_TSEM), printed and drawn as a contact
sheet (the paper's Fig. 5, for any catalogue).

Reads the item features (a parquet table or the output root of ``umair extract``), the
catalogue's ``image_uri`` for the pictures and, when a sample world is given, its
``truth/items.parquet`` (style and content of each illustration) to label the tiles and
print how many neighbours share the query's style / content. No Ray: one matrix product.
"""

from __future__ import annotations

import io
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from umair import contracts, storage
from umair.config import Settings, StorageConfig
from umair.neighbors import SPACE_BY, FeatureIndex

TAG = "[similar]"
By = Literal["style", "semantic", "text"]


class SimilarConfig(Settings):
    """Settings of ``umair similar`` (see pipelines/configs/similar.yaml)."""

    item_features: str = Field(
        "outputs/demo/features", description="item-features table or the output root of umair extract"
    )
    encoder_version: str | None = Field(None, description="feature set of an extraction output holding several")
    text_version: str | None = None
    world: str | None = Field(
        "outputs/demo/world", description="a sample world: catalogue for images, truth/items.parquet for labels"
    )
    illustrations: str | None = Field(
        None, description="catalogue with image_uri (default: WORLD/illustrations.parquet)"
    )
    truth: str | None = Field(
        None, description="table with illust_id and label columns (default: WORLD/truth/items.parquet if present)"
    )
    truth_columns: tuple[str, ...] = ("style_name", "content_name")
    by: By = "style"
    k: int = Field(8, ge=1)
    center: bool = Field(True, description="mean-centre the vectors before the cosine")
    cols: int = Field(5, ge=1, description="tiles per row of the contact sheet")
    out: str | None = Field(None, description="contact sheet PNG; default: outputs/demo/similar/<id>-<by>.png")
    storage: StorageConfig = StorageConfig()


def read_features(
    uri: str,
    columns: list[str],
    encoder_version: str | None,
    text_version: str | None,
    settings: storage.StorageSettings | None,
) -> pa.Table:
    """The item features (contract ``item_features``) from a parquet table or an extraction output."""
    from umair.training.inputs import Inputs, read_item_features

    inputs = Inputs("", "", "", uri, "", encoder_version, text_version)
    return read_item_features(inputs, settings, columns=columns)


def _labels(
    cfg: SimilarConfig, settings: storage.StorageSettings | None
) -> tuple[dict[int, dict[str, str]], str | None]:
    uri = cfg.truth
    if uri is None and cfg.world:
        candidate = storage.join(cfg.world, "truth", "items.parquet")
        uri = candidate if storage.exists(candidate, settings) else None
    if uri is None:
        return {}, None
    table = storage.read_parquet(uri, settings)
    cols = [c for c in cfg.truth_columns if c in table.column_names]
    if "illust_id" not in table.column_names or not cols:
        raise ValueError(
            f"{uri}: expected columns 'illust_id' and some of {list(cfg.truth_columns)} (columns: {', '.join(table.column_names)})"
        )
    ids = table.column("illust_id").to_pylist()
    values = {c: table.column(c).to_pylist() for c in cols}
    short = {c: c.removesuffix("_name") for c in cols}
    return {int(i): {short[c]: str(values[c][r]) for c in cols} for r, i in enumerate(ids)}, uri


def _image(uri: str | None, settings: storage.StorageSettings | None) -> np.ndarray | None:
    if not uri:
        return None
    try:
        from PIL import Image

        with Image.open(io.BytesIO(storage.read_bytes(uri, settings))) as img:
            return np.asarray(img.convert("RGB"))
    except Exception:  # a missing or broken image is drawn as a placeholder tile
        return None


def run(cfg: SimilarConfig, illust_id: int, *, table: bool = True) -> dict[str, Any]:
    """Find, print and draw the ``k`` nearest neighbours of ``illust_id``; return the result.
    ``table=False`` prints nothing (the caller reports the returned ``shares`` and ``out``)."""
    from umair.plots import SheetItem, contact_sheet

    settings = cfg.storage.to_settings()
    space = SPACE_BY[cfg.by]
    features = read_features(cfg.item_features, ["illust_id", space], cfg.encoder_version, cfg.text_version, settings)
    index = FeatureIndex.from_table(features, [space], cfg.item_features, cfg.center)
    ids, sims = index.similar(int(illust_id), space, cfg.k)
    labels, truth_uri = _labels(cfg, settings)
    cat_uri = cfg.illustrations or (storage.join(cfg.world, "illustrations.parquet") if cfg.world else None)
    images: dict[int, str] = {}
    tags: dict[int, list[str]] = {}
    if cat_uri and storage.exists(cat_uri, settings):
        cat = contracts.read_table(cat_uri, "illustrations", settings)
        wanted = {int(illust_id), *map(int, ids)}
        for i, u, t in zip(
            cat.column("illust_id").to_pylist(),
            cat.column("image_uri").to_pylist(),
            cat.column("tags").to_pylist() if "tags" in cat.column_names else [None] * cat.num_rows,
        ):
            if int(i) in wanted:
                images[int(i)], tags[int(i)] = u, t or []
    q = labels.get(int(illust_id), {})
    rows = [
        {
            "rank": r + 1,
            "illust_id": int(i),
            "cosine": float(s),
            **labels.get(int(i), {}),
            "tags": tags.get(int(i)) or [],
        }
        for r, (i, s) in enumerate(zip(ids, sims))
    ]
    shares = {f"same_{k}": float(np.mean([row.get(k) == v for row in rows])) for k, v in q.items()} if rows else {}

    if table:
        print(
            f"{TAG} {len(rows)} nearest to illustration {illust_id} by {cfg.by} (cosine of {space}, "
            f"{'centred' if cfg.center else 'raw'}) among the {int(index.has(space).sum())} of {len(index)} "
            f"with {space} in {cfg.item_features}"
            + (f"; query {', '.join(f'{k}={v}' for k, v in q.items())}" if q else "")
        )
        cols = list(q)
        print(f"  {'rank':>4} {'illust_id':>10} {'cosine':>7}" + "".join(f" {c:>12}" for c in cols) + "  tags")
        for row in rows:
            print(
                f"  {row['rank']:>4} {row['illust_id']:>10} {row['cosine']:>7.4f}"
                + "".join(f" {row.get(c, ''):>12}" for c in cols)
                + "  "
                + " ".join(row["tags"])
            )
        if shares:
            print(
                "  "
                + ", ".join(f"{k.replace('_', ' ')} as the query: {v:.0%}" for k, v in shares.items())
                + f" (ground truth {truth_uri})"
            )

    out = cfg.out or f"outputs/demo/similar/{illust_id}-{cfg.by}.png"
    query = SheetItem(int(illust_id), _image(images.get(int(illust_id)), settings), None, q or None)
    tiles = [
        SheetItem(
            row["illust_id"],
            _image(images.get(row["illust_id"]), settings),
            row["cosine"],
            labels.get(row["illust_id"]),
        )
        for row in rows
    ]
    contact_sheet(query, tiles, f"nearest to {illust_id} by {cfg.by} ({space}, cosine)", out, cfg.cols, settings)
    if table:
        print(f"{TAG} contact sheet: {out}")
    return {"illust_id": int(illust_id), "by": cfg.by, "space": space, "neighbours": rows, "shares": shares, "out": out}


def register(sub: Any) -> None:
    """Add ``umair similar`` to the CLI."""
    import os

    from umair.config import load_with_flags

    def handler(args: Any) -> int:
        keys = ("item_features", "world", "by", "k", "out")
        cfg = load_with_flags(args.config, SimilarConfig, args, keys)
        run(cfg, args.illust_id)
        return 0

    default = "pipelines/configs/similar.yaml"
    p = sub.add_parser(
        "similar", help="nearest illustrations by style / semantic / text cosine, with a contact sheet PNG"
    )
    p.add_argument("illust_id", type=int, help="the query illustration")
    p.add_argument(
        "--by", choices=sorted(SPACE_BY), help="style = e_STY, semantic = e_SEM, text = e_TSEM (default: style)"
    )
    p.add_argument("-k", "--k", type=int, help="how many neighbours (default: 8)")
    p.add_argument(
        "--config", default=default if os.path.exists(default) else None, help=f"settings YAML (default: {default})"
    )
    p.add_argument("--item-features", help="item-features table or extraction output (overrides the config)")
    p.add_argument("--world", help="sample world: images and ground-truth labels (overrides the config)")
    p.add_argument("--out", help="contact sheet PNG path (default: outputs/demo/similar/<id>-<by>.png)")
    p.set_defaults(func=handler)
