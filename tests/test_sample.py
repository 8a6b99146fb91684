"""The sample world: deterministic, valid, and carrying the taste planted in it."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from umair import storage
from umair.contracts import ContractError
from umair.sample import vocab
from umair.sample import world as world_mod
from umair.sample.world import SIZES, WorldError, generate, load_world, render_image, summarize, write_world


def test_same_seed_same_world_byte_for_byte(tmp_path, tiny_world):
    again = write_world(str(tmp_path / "again"), "tiny", seed=3, progress=False)
    for name in (
        "illustrations.parquet",
        "users.parquet",
        "interactions.parquet",
        "truth/items.parquet",
        "truth/users.parquet",
    ):
        a = pq.read_table(os.path.join(tiny_world.root, name))
        b = pq.read_table(os.path.join(again.root, name))
        if name == "illustrations.parquet":  # image URIs name the world's own directory
            a, b = a.drop_columns(["image_uri"]), b.drop_columns(["image_uri"])
        assert a.equals(b), name
    for f in sorted(os.listdir(os.path.join(tiny_world.root, "images")))[:20]:
        with (
            open(os.path.join(tiny_world.root, "images", f), "rb") as x,
            open(os.path.join(again.root, "images", f), "rb") as y,
        ):
            assert x.read() == y.read(), f
    other = generate(SIZES["tiny"], 4, "/unused")
    assert not other.interactions.equals(tiny_world.interactions)


def test_world_validates_and_matches_its_spec(tiny_world):
    world = load_world(tiny_world.root)
    spec = SIZES["tiny"]
    s = summarize(world)
    assert (s["illustrations"], s["users"]) == (spec.n_items, spec.n_users)
    assert s["train_interactions"] > 0 and s["test_interactions"] > 0
    assert s["tastes"] == {"style": 8, "content": 7, "tag": 4, "popularity": 5}  # 24 users at 35/30/15/20 %, rounded
    assert all(n > 0 for n in s["tags_by_language"].values())
    uris = world.illustrations.column("image_uri").to_pylist()
    assert {u.rsplit(".", 1)[1] for u in uris} == {"jpg", "png"}
    for uri in uris[:10]:
        with Image.open(io.BytesIO(storage.read_bytes(uri))) as img:
            assert img.mode == "RGB"
    row = 5
    assert (
        world.illustrations.column("width")[row].as_py(),
        world.illustrations.column("height")[row].as_py(),
    ) == Image.open(uris[row]).size
    manifest = json.loads(open(os.path.join(tiny_world.root, "world.json")).read())
    assert manifest["counts"]["interactions"] == world.interactions.num_rows


def test_tags_name_one_concept_in_several_languages(tiny_world):
    tags = [t for ts in tiny_world.illustrations.column("tags").to_pylist() for t in ts]
    assert all(vocab.concept_of(t) is not None for t in tags)
    by_concept: dict[str, set[str]] = {}
    for t in tags:
        by_concept.setdefault(vocab.concept_of(t), set()).add(t)
    assert max(len(v) for v in by_concept.values()) >= 2  # e.g. "moon" and "月"
    # Subject tags follow content: most items carry their content's subject concept.
    contents = tiny_world.truth_items.column("content_name").to_pylist()
    hits = [
        vocab.CONTENT_CONCEPTS[c][0] in {vocab.concept_of(t) for t in ts}
        for c, ts in zip(contents, tiny_world.illustrations.column("tags").to_pylist())
    ]
    assert np.mean(hits) > 0.8


def test_planted_taste_shows_in_the_bookmarks():
    world = generate(SIZES["small"], 11, "/unused")
    truth_u = world.truth_users.to_pandas().set_index("user_id")
    truth_i = world.truth_items.to_pandas().set_index("illust_id")
    inter = world.interactions.to_pandas()
    inter = inter.join(truth_u, on="user_id").join(truth_i, on="illust_id")
    style = inter[inter.taste == "style"]
    match = style["style"] == style["pref_style"]
    assert style[match]["label"].mean() > 0.6 > 0.15 > style[~match]["label"].mean()
    content = inter[inter.taste == "content"]
    match = content["content"] == content["pref_content"]
    assert content[match]["label"].mean() > 0.6 > 0.15 > content[~match]["label"].mean()
    pop = inter[inter.taste == "popularity"]
    assert np.corrcoef(np.log(pop["popularity"]), pop["label"])[0, 1] > 0.3


def _colour_texture_stats(data: bytes) -> np.ndarray:
    """Global colour and texture statistics; no shape information."""
    a = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float32)
    lum = a.mean(2)
    gx, gy = np.abs(np.diff(lum, axis=1)).mean(), np.abs(np.diff(lum, axis=0)).mean()
    lap = np.abs(4 * lum[1:-1, 1:-1] - lum[:-2, 1:-1] - lum[2:, 1:-1] - lum[1:-1, :-2] - lum[1:-1, 2:]).mean()
    hist = np.histogram(lum, bins=8, range=(0, 255))[0] / lum.size
    return np.concatenate([a.mean((0, 1)), a.std((0, 1)), [gx, gy, lap], hist])


def test_style_is_in_colour_and_texture_statistics_but_content_is_not():
    world = generate(SIZES["small"], 5, "/unused")
    x = np.stack([_colour_texture_stats(render_image(world, i)) for i in range(world.illustrations.num_rows)])
    scores = {}
    for factor in ("style", "content"):
        y = world.truth_items.column(factor).to_numpy()
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        chance = np.bincount(y).max() / len(y)
        scores[factor] = (cross_val_score(clf, x, y, cv=5).mean(), chance)
    style_acc, style_chance = scores["style"]
    content_acc, content_chance = scores["content"]
    assert style_acc > 0.95 and style_acc > style_chance + 0.6, scores
    assert content_acc < content_chance + 0.15, scores


def test_write_to_object_storage_and_validate_there(s3_server):
    out = s3_server.uri("worlds", "tiny")
    world = write_world(out, "tiny", seed=3, settings=s3_server.settings, progress=False)
    assert world.illustrations.column("image_uri")[0].as_py().startswith(out + "/images/")
    loaded = load_world(out, s3_server.settings)
    assert loaded.interactions.num_rows == world.interactions.num_rows
    with pytest.raises(FileExistsError, match="already holds a world"):
        write_world(out, "tiny", seed=3, settings=s3_server.settings, progress=False)
    write_world(out, "tiny", seed=4, overwrite=True, settings=s3_server.settings, progress=False)
    assert load_world(out, s3_server.settings).seed == 4


def test_incomplete_or_damaged_worlds_are_refused(tmp_path, tiny_world, monkeypatch):
    with pytest.raises(WorldError, match="no world.json manifest"):
        load_world(str(tmp_path))
    # A run that fails half-way leaves nothing behind, neither the world nor its staging dir.
    calls = {"n": 0}
    real = world_mod.render_image

    def failing(world, row):
        calls["n"] += 1
        if calls["n"] == 30:
            raise RuntimeError("disk on fire")
        return real(world, row)

    monkeypatch.setattr(world_mod, "render_image", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_world(str(tmp_path / "w"), "tiny", seed=1, progress=False, workers=1)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    # A missing image is caught by validation.
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_world.root, copy)
    import pyarrow as pa

    ills = pq.read_table(copy / "illustrations.parquet")
    uris = [u.replace(tiny_world.root, str(copy)) for u in ills.column("image_uri").to_pylist()]
    pq.write_table(ills.set_column(1, "image_uri", pa.array(uris)), copy / "illustrations.parquet")
    os.remove(uris[7])
    with pytest.raises(
        ContractError,
        match=r"column 'image_uri' \(row 7\): expected an existing image file, found missing .* \(1 missing in all\)",
    ):
        load_world(str(copy))
    with pytest.raises(FileExistsError, match="not empty"):
        write_world(str(copy), "tiny", seed=1, progress=False)
