"""The sample illustration world: a small catalogue, users and bookmark logs with a
taste planted in them, written to a local directory or an ``s3://`` prefix.

Layout of a world (every table follows :mod:`umair.contracts`)::

    WORLD/
      world.json               manifest; written last, so its presence means "complete"
      illustrations.parquet    illust_id, image_uri, tags, created_at, width, height, page_count, artist
      users.parquet            user_id, interest_tags, gender, age_group, region
      interactions.parquet     user_id, illust_id, ts, label  (train window, then test window)
      vocab/names.parquet      concept, lang, name: the multilingual tag names
      truth/items.parquet      illust_id, style, content, popularity (the latent factors)
      truth/users.parquet      user_id, taste, pref_style, pref_content, pref_concept
      images/<illust_id>.jpg|png

Users come in four planted tastes, in known proportions: ``style`` users bookmark one
painting style, ``content`` users one subject, ``tag`` users one tag concept (whatever
the language it is written in), ``popularity`` users what is popular. The same seed
always gives the same world, byte for byte.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

import numpy as np
import pyarrow as pa
from PIL import Image
from tqdm import tqdm

from umair import contracts, storage
from umair.errors import UmairError
from umair.sample import vocab
from umair.sample.painter import CONTENTS, STYLES, paint

SizeName = Literal["tiny", "small", "default"]
TASTES = ("style", "content", "tag", "popularity")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class WorldSpec:
    """Everything that shapes a world. Presets: :data:`SIZES`."""

    n_items: int
    n_users: int
    n_artists: int
    n_styles: int
    n_contents: int
    impressions_per_user: int
    image_size: int
    taste_mix: dict[str, float] = field(
        default_factory=lambda: {"style": 0.35, "content": 0.30, "tag": 0.15, "popularity": 0.20}
    )
    png_fraction: float = 0.25
    start: str = "2021-01-01"
    split: str = "2021-10-01"  # train window [start, split), test window [split, end)
    end: str = "2022-01-01"
    p_like: float = 0.75  # bookmark probability when the planted taste matches
    p_base: float = 0.06  # bookmark probability otherwise

    def __post_init__(self) -> None:
        if not 1 <= self.n_styles <= len(STYLES):
            raise ValueError(f"n_styles must be in 1..{len(STYLES)}, got {self.n_styles}")
        if not 1 <= self.n_contents <= len(CONTENTS):
            raise ValueError(f"n_contents must be in 1..{len(CONTENTS)}, got {self.n_contents}")
        if set(self.taste_mix) - set(TASTES) or abs(sum(self.taste_mix.values()) - 1) > 1e-6:
            raise ValueError(f"taste_mix must map {TASTES} to proportions summing to 1, got {self.taste_mix}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be at least 16 pixels, got {self.image_size}")


SIZES: dict[str, WorldSpec] = {
    "tiny": WorldSpec(
        n_items=96, n_users=24, n_artists=9, n_styles=3, n_contents=4, impressions_per_user=24, image_size=32
    ),
    "small": WorldSpec(
        n_items=600, n_users=120, n_artists=24, n_styles=4, n_contents=6, impressions_per_user=40, image_size=48
    ),
    "default": WorldSpec(
        n_items=2400, n_users=400, n_artists=40, n_styles=4, n_contents=6, impressions_per_user=60, image_size=64
    ),
}


def _utc(day: str) -> datetime:
    return datetime.fromisoformat(day).replace(tzinfo=UTC)


@dataclass
class World:
    """A world in memory: its tables and, until written, the recipe for its images."""

    spec: WorldSpec
    seed: int
    illustrations: pa.Table
    users: pa.Table
    interactions: pa.Table
    truth_items: pa.Table
    truth_users: pa.Table
    names: pa.Table
    root: str = ""
    manifest: dict = field(default_factory=dict)
    checks: contracts.CheckReport | None = None  # what load_world's cross-table rules counted


def _taste_counts(n: int, mix: dict[str, float]) -> list[str]:
    counts = {t: int(round(n * mix.get(t, 0.0))) for t in TASTES}
    counts["style"] += n - sum(counts.values())
    return [t for t in TASTES for _ in range(counts[t])]


def _pick_lang(rng: np.random.Generator, preferred: str) -> str:
    return preferred if rng.random() < 0.7 else vocab.LANGUAGES[rng.integers(len(vocab.LANGUAGES))]


def generate(spec: WorldSpec, seed: int, root: str) -> World:
    """Draw a world's tables (images are rendered when written). ``root`` is where it will live."""
    rng = np.random.default_rng(seed)
    start, end = _utc(spec.start), _utc(spec.end)
    contents = [CONTENTS[i].name for i in range(spec.n_contents)]

    # Artists: each paints in one style and tags mostly in one language.
    artist_style = np.array([a % spec.n_styles for a in range(spec.n_artists)])
    artist_lang = [vocab.LANGUAGES[rng.integers(len(vocab.LANGUAGES))] for _ in range(spec.n_artists)]

    # Illustrations: style (via artist) and content are independent.
    ids = 1000 + np.arange(spec.n_items, dtype=np.int64) * 7
    artist = rng.integers(spec.n_artists, size=spec.n_items)
    style = artist_style[artist]
    content = rng.integers(spec.n_contents, size=spec.n_items)
    popularity = rng.lognormal(0.0, 1.0, size=spec.n_items)
    span = (end - timedelta(days=1) - (start - timedelta(days=90))).total_seconds()
    created = [
        start - timedelta(days=90) + timedelta(seconds=float(s)) for s in np.sort(rng.uniform(0, span, spec.n_items))
    ]
    created = [created[i] for i in rng.permutation(spec.n_items)]
    aspect = rng.choice([1.0, 1.25, 0.8], size=spec.n_items, p=[0.6, 0.2, 0.2])
    width = np.full(spec.n_items, spec.image_size, dtype=np.int32)
    height = np.maximum(16, np.round(spec.image_size * aspect)).astype(np.int32)
    page_count = np.where(rng.random(spec.n_items) < 0.8, 1, rng.integers(2, 5, size=spec.n_items)).astype(np.int32)
    is_png = rng.random(spec.n_items) < spec.png_fraction

    tags: list[list[str]] = []
    subject_of_item: list[str] = []
    for i in range(spec.n_items):
        subject, theme = vocab.CONTENT_CONCEPTS[contents[content[i]]]
        subject_of_item.append(subject)
        lang = artist_lang[artist[i]]
        chosen: list[str] = []
        if rng.random() < 0.9:
            chosen.append(subject)
        if rng.random() < 0.6:
            chosen.append(theme)
        if rng.random() < 0.3:
            chosen.append(vocab.NOISE_CONCEPTS[rng.integers(len(vocab.NOISE_CONCEPTS))])
        if rng.random() < 0.08:  # a wrong subject tag: artists' tags are noisy
            chosen.append(vocab.CONTENT_CONCEPTS[contents[rng.integers(spec.n_contents)]][0])
        names = []
        for c in chosen:
            name = vocab.CONCEPTS[c][_pick_lang(rng, lang)]
            if name not in names:
                names.append(name)
        tags.append(names)
    item_concepts = [{vocab.concept_of(t) for t in ts} for ts in tags]

    image_uri = [storage.join(root, "images", f"{int(i)}.{'png' if p else 'jpg'}") for i, p in zip(ids, is_png)]
    illustrations = pa.table(
        {
            "illust_id": pa.array(ids, pa.int64()),
            "image_uri": pa.array(image_uri, pa.string()),
            "tags": pa.array(tags, contracts.TAGS),
            "created_at": pa.array(created, contracts.TIMESTAMP),
            "width": pa.array(width, pa.int32()),
            "height": pa.array(height, pa.int32()),
            "page_count": pa.array(page_count, pa.int32()),
            "artist": pa.array([f"artist_{a:03d}" for a in artist], pa.string()),
        }
    )
    truth_items = pa.table(
        {
            "illust_id": pa.array(ids, pa.int64()),
            "style": pa.array(style, pa.int32()),
            "style_name": pa.array([STYLES[s].name for s in style]),
            "content": pa.array(content, pa.int32()),
            "content_name": pa.array([contents[c] for c in content]),
            "popularity": pa.array(popularity, pa.float64()),
        }
    )

    # Users: a planted taste each, plus profile fields that carry no taste.
    tastes = _taste_counts(spec.n_users, spec.taste_mix)
    tastes = [tastes[i] for i in rng.permutation(spec.n_users)]
    user_ids = np.arange(1, spec.n_users + 1, dtype=np.int64)
    tag_targets = sorted({c for pair in (vocab.CONTENT_CONCEPTS[c] for c in contents) for c in pair})
    pref_style = rng.integers(spec.n_styles, size=spec.n_users)
    pref_content = rng.integers(spec.n_contents, size=spec.n_users)
    pref_concept = [tag_targets[j] for j in rng.integers(len(tag_targets), size=spec.n_users)]
    all_concepts = sorted(vocab.CONCEPTS)
    interest_tags = []
    for u in range(spec.n_users):
        lang = vocab.LANGUAGES[rng.integers(len(vocab.LANGUAGES))]
        mine: list[str] = []
        if tastes[u] == "tag":
            mine.append(vocab.CONCEPTS[pref_concept[u]][lang])
        elif tastes[u] == "content" and rng.random() < 0.5:
            mine.append(vocab.CONCEPTS[vocab.CONTENT_CONCEPTS[contents[pref_content[u]]][0]][lang])
        for _ in range(rng.integers(0, 3)):
            name = vocab.CONCEPTS[all_concepts[rng.integers(len(all_concepts))]][_pick_lang(rng, lang)]
            if name not in mine:
                mine.append(name)
        interest_tags.append(mine)
    users = pa.table(
        {
            "user_id": pa.array(user_ids, pa.int64()),
            "interest_tags": pa.array(interest_tags, contracts.TAGS),
            "gender": pa.array(rng.choice(["f", "m", "x"], size=spec.n_users, p=[0.45, 0.45, 0.1]).tolist()),
            "age_group": pa.array(rng.choice(["<18", "18-24", "25-34", "35+"], size=spec.n_users).tolist()),
            "region": pa.array(rng.choice(["jp", "cn", "us", "other"], size=spec.n_users).tolist()),
        }
    )
    truth_users = pa.table(
        {
            "user_id": pa.array(user_ids, pa.int64()),
            "taste": pa.array(tastes),
            "pref_style": pa.array([int(s) if t == "style" else None for s, t in zip(pref_style, tastes)], pa.int32()),
            "pref_content": pa.array(
                [int(c) if t == "content" else None for c, t in zip(pref_content, tastes)], pa.int32()
            ),
            "pref_concept": pa.array([c if t == "tag" else None for c, t in zip(pref_concept, tastes)], pa.string()),
        }
    )

    # Impressions over time; a bookmark when the planted taste matches (mostly).
    created_s = np.array([c.timestamp() for c in created])
    order = np.argsort(created_s)
    sorted_created = created_s[order]
    pop_z = (np.log(popularity) - np.log(popularity).mean()) / np.log(popularity).std()
    rows_u, rows_i, rows_ts, rows_y = [], [], [], []
    for u in range(spec.n_users):
        k = max(5, int(rng.poisson(spec.impressions_per_user)))
        ts = np.sort(rng.uniform(start.timestamp(), end.timestamp(), size=k))
        seen: set[int] = set()
        for t in ts:
            n_avail = int(np.searchsorted(sorted_created, t, side="right"))
            if n_avail == 0:
                continue
            pool = order[:n_avail]
            w = popularity[pool] ** 0.7
            item = int(pool[rng.choice(n_avail, p=w / w.sum())])
            if item in seen:
                continue
            seen.add(item)
            taste = tastes[u]
            if taste == "style":
                match = style[item] == pref_style[u]
                p = spec.p_like if match else spec.p_base
            elif taste == "content":
                p = spec.p_like if content[item] == pref_content[u] else spec.p_base
            elif taste == "tag":
                p = spec.p_like if pref_concept[u] in item_concepts[item] else spec.p_base
            else:
                p = spec.p_base + (spec.p_like - spec.p_base) / (1 + np.exp(-2.0 * (pop_z[item] - 0.8)))
            rows_u.append(user_ids[u])
            rows_i.append(ids[item])
            rows_ts.append(datetime.fromtimestamp(float(t), tz=UTC))
            rows_y.append(int(rng.random() < p))
    by_time = np.argsort(np.array([t.timestamp() for t in rows_ts]), kind="stable")
    interactions = pa.table(
        {
            "user_id": pa.array(np.array(rows_u, np.int64)[by_time], pa.int64()),
            "illust_id": pa.array(np.array(rows_i, np.int64)[by_time], pa.int64()),
            "ts": pa.array([rows_ts[j] for j in by_time], contracts.TIMESTAMP),
            "label": pa.array(np.array(rows_y, np.int8)[by_time], pa.int8()),
        }
    )
    names = pa.Table.from_pylist(vocab.name_table())
    return World(spec, seed, illustrations, users, interactions, truth_items, truth_users, names, root=root)


def render_image(world: World, row: int) -> bytes:
    """The encoded bytes of illustration ``row`` (deterministic per seed and id)."""
    ill = world.illustrations
    illust_id = ill.column("illust_id")[row].as_py()
    rng = np.random.default_rng([world.seed, illust_id])
    style = STYLES[world.truth_items.column("style")[row].as_py()]
    content = CONTENTS[world.truth_items.column("content")[row].as_py()]
    pixels = paint(style, content, ill.column("height")[row].as_py(), ill.column("width")[row].as_py(), rng)
    buf = io.BytesIO()
    if ill.column("image_uri")[row].as_py().endswith(".png"):
        Image.fromarray(pixels).save(buf, format="PNG")
    else:
        Image.fromarray(pixels).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _manifest(world: World, size: str) -> dict:
    labels = world.interactions.column("label").to_numpy()
    return {
        "format_version": FORMAT_VERSION,
        "kind": "umair-sample-world",
        "seed": world.seed,
        "size": size,
        "spec": asdict(world.spec),
        "windows": {"train": [world.spec.start, world.spec.split], "test": [world.spec.split, world.spec.end]},
        "counts": {
            "illustrations": world.illustrations.num_rows,
            "users": world.users.num_rows,
            "interactions": world.interactions.num_rows,
            "bookmarks": int(labels.sum()),
        },
        "styles": [STYLES[i].name for i in range(world.spec.n_styles)],
        "contents": [CONTENTS[i].name for i in range(world.spec.n_contents)],
    }


TABLE_FILES = {
    "illustrations": "illustrations.parquet",
    "users": "users.parquet",
    "interactions": "interactions.parquet",
}


def write_world(
    out: str,
    size: SizeName | WorldSpec = "tiny",
    seed: int = 0,
    overwrite: bool = False,
    settings: storage.StorageSettings | None = None,
    workers: int = 8,
    progress: bool = True,
) -> World:
    """Generate and write a world to ``out`` (local directory or s3:// prefix).

    Nothing half-written is ever taken for a world: locally everything is written to a
    staging directory renamed into place at the end; on object storage the manifest
    ``world.json`` is written last and readers refuse a prefix without it.
    """
    spec = SIZES[size] if isinstance(size, str) else size
    size_name = size if isinstance(size, str) else "custom"
    manifest_uri = storage.join(out, "world.json")
    if storage.is_s3(out):
        if storage.exists(manifest_uri, settings) and not overwrite:
            raise FileExistsError(f"{out} already holds a world; pass overwrite=True (--overwrite) to replace it")
        storage.delete_dir(out, settings)
        stage = out
    else:
        out = os.path.abspath(out)
        if os.path.exists(out) and os.listdir(out) and not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
        stage = f"{out}.partial-{uuid.uuid4().hex[:8]}"
    world = generate(spec, seed, out)
    try:

        def put(row: int) -> None:
            name = os.path.basename(world.illustrations.column("image_uri")[row].as_py())
            storage.write_bytes(storage.join(stage, "images", name), render_image(world, row), settings)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            bar = tqdm(
                total=world.illustrations.num_rows,
                desc="images",
                unit="img",
                disable=not progress,
                file=sys.stderr,
                mininterval=1.0,
            )
            for _ in pool.map(put, range(world.illustrations.num_rows)):
                bar.update(1)
            bar.close()
        for kind, fname in TABLE_FILES.items():
            storage.write_parquet(getattr(world, kind), storage.join(stage, fname), settings)
        storage.write_parquet(world.names, storage.join(stage, "vocab", "names.parquet"), settings)
        storage.write_parquet(world.truth_items, storage.join(stage, "truth", "items.parquet"), settings)
        storage.write_parquet(world.truth_users, storage.join(stage, "truth", "users.parquet"), settings)
        world.manifest = _manifest(world, size_name)
        storage.write_bytes(storage.join(stage, "world.json"), json.dumps(world.manifest, indent=2).encode(), settings)
        if stage != out:
            if os.path.exists(out):
                shutil.rmtree(out)
            storage.move_dir(stage, out)
    except BaseException:
        if stage != out and os.path.exists(stage):
            shutil.rmtree(stage, ignore_errors=True)
        raise
    world.root = out
    return world


class WorldError(UmairError, ValueError):
    """A world directory is incomplete or inconsistent."""


def load_world(
    root: str,
    settings: storage.StorageSettings | None = None,
    check_images: bool = True,
    checks: contracts.Checks | None = None,
) -> World:
    """Read and validate a world: every table against its contract, the cross-table
    rules (``checks``: how to treat interactions before created_at; default warn), and
    (``check_images``) that every image the catalogue names is there (a NULL image_uri,
    an item without an image, is not checked)."""
    manifest_uri = storage.join(root, "world.json")
    if not storage.exists(manifest_uri, settings):
        raise WorldError(f"{root}: no world.json manifest; this is not a (complete) sample world")
    manifest = json.loads(storage.read_bytes(manifest_uri, settings))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise WorldError(
            f"{manifest_uri}: expected format_version {FORMAT_VERSION}, found {manifest.get('format_version')}"
        )
    tables = {kind: contracts.read_table(storage.join(root, f), kind, settings) for kind, f in TABLE_FILES.items()}
    report = contracts.check_interactions(
        tables["interactions"],
        tables["users"],
        tables["illustrations"],
        storage.join(root, TABLE_FILES["interactions"]),
        checks,
    )
    if check_images:
        present = set(storage.list_files(storage.join(root, "images"), settings))
        uris = tables["illustrations"].column("image_uri").to_pylist()
        if not storage.is_s3(root):
            present = {os.path.abspath(p) for p in present}
        missing = [(i, u) for i, u in enumerate(uris) if u is not None and u not in present]
        if missing:
            row, uri = missing[0]
            raise contracts.ContractError(
                storage.join(root, TABLE_FILES["illustrations"]),
                "image_uri",
                "an existing image file",
                f"missing {uri} ({len(missing)} missing in all)",
                row,
            )
    spec = WorldSpec(**manifest["spec"])
    return World(
        spec=spec,
        seed=manifest["seed"],
        illustrations=tables["illustrations"],
        users=tables["users"],
        interactions=tables["interactions"],
        truth_items=storage.read_parquet(storage.join(root, "truth", "items.parquet"), settings),
        truth_users=storage.read_parquet(storage.join(root, "truth", "users.parquet"), settings),
        names=storage.read_parquet(storage.join(root, "vocab", "names.parquet"), settings),
        root=root,
        manifest=manifest,
        checks=report,
    )


def _all_tags(illustrations: pa.Table) -> list[str]:
    """Every tag of the catalogue (NULL lists skipped; none when there is no tags column)."""
    if "tags" not in illustrations.column_names:
        return []
    return [t for tags in illustrations.column("tags").to_pylist() if tags for t in tags if t is not None]


def summarize(world: World) -> dict:
    """Counts a person checks first: sizes, windows, bookmark rates, planted tastes.
    Tags outside the sample vocabulary (a world built from real tables) count as
    ``tags_by_language["other"]``."""
    inter = world.interactions
    split = _utc(world.spec.split)
    ts = inter.column("ts").to_pylist()
    labels = inter.column("label").to_numpy()
    train = np.array([t < split for t in ts])
    tastes = world.truth_users.column("taste").to_pylist()
    tags = _all_tags(world.illustrations)
    langs = {lang: 0 for lang in vocab.LANGUAGES}
    for t in tags:
        concept = vocab.concept_of(t)
        lang = next((lg for lg in vocab.LANGUAGES if concept and vocab.CONCEPTS[concept][lg] == t), "other")
        langs[lang] = langs.get(lang, 0) + 1
    return {
        "root": world.root,
        "seed": world.seed,
        "illustrations": world.illustrations.num_rows,
        "users": world.users.num_rows,
        "interactions": inter.num_rows,
        "train_interactions": int(train.sum()),
        "test_interactions": int((~train).sum()),
        "bookmark_rate_train": round(float(labels[train].mean()), 3) if train.any() else None,
        "bookmark_rate_test": round(float(labels[~train].mean()), 3) if (~train).any() else None,
        "tastes": {t: tastes.count(t) for t in TASTES},
        "styles": world.spec.n_styles,
        "contents": world.spec.n_contents,
        "distinct_tags": len(set(tags)),
        "tags_by_language": langs,
        "image_size": world.spec.image_size,
    }
