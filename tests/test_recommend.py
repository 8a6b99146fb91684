"""Using the model: ranking metrics by hand, cosine neighbours against the sample
world's ground truth (style / content), the recommend job (Ray Data) against a
popularity ranking, and the similar / explain commands with their PNGs and errors.

Item features come from :func:`umair.baselines.sample_features.fixture_item_features` over the
``small`` sample world, with the dual encoder first trained briefly on the pretext task
(the world's tags; ``pretext_encoder``): no label of the ground truth enters a feature.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from umair.ivf import cosine_topk
from umair.neighbors import CandidateGenerator, CandidateSettings, FeatureIndex, UnknownIdError, unit_rows
from umair.ranking import (
    bookmark_counts,
    dcg_at_k,
    evaluate_rankings,
    ndcg_at_k,
    popularity_order,
    popularity_ranking,
    recall_at_k,
)

ROOT = Path(__file__).resolve().parents[1]
UMAIR = str(Path(sys.executable).parent / "umair")


# --------------------------------------------------------------------------- metrics by hand


def test_recall_and_ndcg_match_hand_computed_values():
    ranked = [10, 20, 30, 40, 50]
    relevant = {20, 50, 99}
    # top-3 holds 20 only: 1/3; top-5 holds 20 and 50: 2/3
    assert recall_at_k(ranked, relevant, 3) == pytest.approx(1 / 3)
    assert recall_at_k(ranked, relevant, 5) == pytest.approx(2 / 3)
    # DCG@5 = 1/log2(3) + 1/log2(6); IDCG@5 = 1 + 1/log2(3) + 1/log2(4) (three relevant items)
    dcg = 1 / np.log2(3) + 1 / np.log2(6)
    assert dcg_at_k(ranked, relevant, 5) == pytest.approx(dcg)
    assert ndcg_at_k(ranked, relevant, 5) == pytest.approx(dcg / (1 + 1 / np.log2(3) + 0.5))
    # IDCG@2 counts min(K, |R|) = 2 ideal hits: 1 + 1/log2(3)
    assert ndcg_at_k(ranked, relevant, 2) == pytest.approx((1 / np.log2(3)) / (1 + 1 / np.log2(3)))
    assert ndcg_at_k([99, 20, 50], relevant, 3) == pytest.approx(1.0)
    assert np.isnan(recall_at_k(ranked, set(), 5)) and np.isnan(ndcg_at_k(ranked, [], 5))
    with pytest.raises(ValueError, match="K must be >= 1"):
        recall_at_k(ranked, relevant, 0)


def test_ndcg_equals_scikit_learn_on_the_ranked_items():
    from sklearn.metrics import ndcg_score

    rng = np.random.default_rng(1)
    for _ in range(20):
        ranked = rng.permutation(30)[:12]
        # every relevant item is in the list: scikit-learn's ideal is over the listed items only
        relevant = set(rng.choice(ranked, size=int(rng.integers(1, 6)), replace=False).tolist())
        gains = np.array([[1.0 if x in relevant else 0.0 for x in ranked]])
        scores = np.array([np.arange(len(ranked), 0, -1, dtype=float)])
        assert ndcg_at_k(ranked, relevant, 5) == pytest.approx(ndcg_score(gains, scores, k=5))


def test_evaluate_rankings_averages_users_and_skips_those_without_relevant_items():
    rankings = {1: [5, 6, 7], 2: [8, 9, 5], 3: [1, 2, 3]}
    relevant = {1: {5}, 2: {5, 4}, 3: set()}
    r = evaluate_rankings(rankings, relevant, [1, 3], users=[1, 2, 3, 4])
    # user 1: recall@1 = 1, @3 = 1; user 2: @1 = 0, @3 = 1/2; users 3 and 4: no relevant item
    assert r.recall == pytest.approx({1: 0.5, 3: 0.75})
    assert r.ndcg[1] == pytest.approx(0.5)
    assert r.ndcg[3] == pytest.approx((1.0 + (1 / np.log2(4)) / (1 + 1 / np.log2(3))) / 2)
    assert (r.users, r.skipped, r.relevant, r.hits[3]) == (2, 2, 3, 2)


def test_popularity_order_counts_bookmarks_and_breaks_ties_by_recency_then_id():
    ids = np.array([1, 2, 3, 4])
    counts = bookmark_counts(ids, np.array([3, 3, 1, 2, 2, 3, 9]))
    np.testing.assert_array_equal(counts, [1, 2, 3, 0])
    order = popularity_order(np.array([1, 2, 3, 4, 5]), np.array([1, 2, 2, 0, 2]), np.array([0, 5, 9, 1, 9]))
    np.testing.assert_array_equal(order, [3, 5, 2, 1, 4])
    assert popularity_ranking(order, 3, exclude={5, 1}) == [3, 2, 4]


def test_cosine_topk_and_candidates_by_hand():
    x = unit_rows(np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]]), center=False)
    rows, sims = cosine_topk(x[0], x, 2, banned=np.array([True, False, False, False]))
    assert rows.tolist() == [[1, 2]] and sims[0, 0] == pytest.approx(0.9 / np.hypot(0.9, 0.1))
    import pyarrow as pa

    table = pa.table(
        {
            "illust_id": pa.array([10, 20, 30, 40], pa.int64()),
            "sem": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 2),
        }
    )
    index = FeatureIndex.from_table(table, ["sem"], "feat.parquet", center=False)
    with pytest.raises(UnknownIdError, match="illustration 77 is not in the item features feat.parquet"):
        index.similar(77, "sem", 2)
    # item 40 is not yet published; the user bookmarked item 10 and must not get it back
    gen = CandidateGenerator(
        index,
        np.array([True, True, True, False]),
        np.array([1.0, 2.0, 3.0, 4.0]),
        np.array([5, 0, 1, 9]),
        CandidateSettings(recent=1, popular=1, neighbors=1, seeds=1, spaces=("sem",)),
    )
    c = gen.for_user(np.array([0]), np.array([0]))
    assert index.illust_ids[c.rows].tolist() == [30, 20]  # recent: 30; popular: 30 (10 excluded); knn of 10: 20
    assert c.sources == {"recent": 1, "popular": 1, "knn_sem": 1}


# --------------------------------------------------------------------------- the small world and its features


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The small sample world and item features from a pretext-trained ResNet18 (32 px)."""
    import torch

    from umair.baselines import sample_features
    from umair.sample.world import write_world

    root = tmp_path_factory.mktemp("recommend")
    world = write_world(str(root / "world"), "small", seed=3, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        # 6 pretext epochs (~20 s on 2 cores): enough for e_SEM to find the same content across
        # styles (3 epochs are not: its neighbours then follow the style as e_STY's do).
        encoder = sample_features.pretext_encoder(world, image_size=32, epochs=6, seed=0)
        features = sample_features.fixture_item_features(
            world,
            str(root / "features.parquet"),
            encoder,
            image_size=32,
            tsem_dim=16,
            seed=0,
            encoder_version="fixture-resnet18-32px-pretext6-seed0",
        )
    finally:
        torch.set_num_threads(threads)
    return {"world": world, "features": features, "root": root}


def _truth(small) -> tuple[dict[int, int], dict[int, int]]:
    truth = small["world"].truth_items
    ids = truth.column("illust_id").to_pylist()
    return dict(zip(ids, truth.column("style").to_pylist())), dict(zip(ids, truth.column("content").to_pylist()))


def _neighbour_shares(small, space: str, k: int = 5) -> tuple[float, float]:
    """Mean share of each illustration's k nearest (cosine in ``space``) sharing its true style / content."""
    style, content = _truth(small)
    index = FeatureIndex.from_table(pq.read_table(small["features"]), [space], small["features"])
    same_style, same_content = [], []
    for q in index.illust_ids[::3]:
        ids, sims = index.similar(int(q), space, k)
        assert len(ids) == k and int(q) not in ids.tolist() and (np.diff(sims) <= 1e-6).all()
        same_style.append(np.mean([style[int(i)] == style[int(q)] for i in ids]))
        same_content.append(np.mean([content[int(i)] == content[int(q)] for i in ids]))
    return float(np.mean(same_style)), float(np.mean(same_content))


def _cross_style_content_share(small, space: str, k: int = 5) -> float:
    """Mean share of same-content items among each illustration's k nearest of *other* styles:
    what a space knows of content once style cannot help (chance: ~1/6)."""
    style, content = _truth(small)
    index = FeatureIndex.from_table(pq.read_table(small["features"]), [space], small["features"])
    st = np.array([style[int(i)] for i in index.illust_ids])
    shares = []
    for q in index.illust_ids[::3]:
        ids, _ = index.similar(int(q), space, k, allowed=st != style[int(q)])
        shares.append(np.mean([content[int(i)] == content[int(q)] for i in ids]))
    return float(np.mean(shares))


def test_similar_by_style_finds_the_same_style_and_by_semantic_the_same_content(small):
    truth = small["world"].truth_items
    counts = np.bincount(truth.column("content").to_numpy())
    chance_content = float(np.sum(counts.astype(float) ** 2) / truth.num_rows**2)
    sty_style, sty_content = _neighbour_shares(small, "sty")
    sem_style, sem_content = _neighbour_shares(small, "sem")
    assert sty_style >= 0.9, sty_style  # chance: ~1/4
    assert sem_content >= 0.5 and sem_content >= 2.5 * chance_content, (sem_content, chance_content)
    # e_SEM is the content space, e_STY the style space: across styles, e_SEM's neighbours
    # share the content far more often than e_STY's (which stay near chance).
    sem_cross, sty_cross = _cross_style_content_share(small, "sem"), _cross_style_content_share(small, "sty")
    assert sem_cross >= 0.4 and sem_cross >= 2 * sty_cross, (sem_cross, sty_cross, chance_content)
    assert sty_cross <= 2 * chance_content, (sty_cross, chance_content)
    assert sem_content > sty_content, (sem_content, sty_content)


def test_similar_cli_prints_neighbours_draws_a_contact_sheet_and_refuses_unknown_ids(small, tmp_path):
    world = small["world"]
    q = int(world.illustrations.column("illust_id")[5].as_py())
    out = tmp_path / "sheet.png"
    proc = subprocess.run(
        [
            UMAIR,
            "similar",
            str(q),
            "--by",
            "style",
            "-k",
            "6",
            "--item-features",
            small["features"],
            "--world",
            world.root,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"nearest to illustration {q} by style" in proc.stdout and "same style as the query" in proc.stdout
    with Image.open(out) as img:
        assert img.width > 500 and img.height > 300  # 7 tiles, 5 per row
    # --by semantic searches e_SEM: the printed neighbours are e_SEM's, best first.
    proc = subprocess.run(
        [
            UMAIR,
            "similar",
            str(q),
            "--by",
            "semantic",
            "-k",
            "4",
            "--item-features",
            small["features"],
            "--world",
            world.root,
            "--out",
            str(tmp_path / "sem.png"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"nearest to illustration {q} by semantic" in proc.stdout and (tmp_path / "sem.png").is_file()
    index = FeatureIndex.from_table(pq.read_table(small["features"]), ["sem"], small["features"])
    expected, _ = index.similar(q, "sem", 4)
    printed = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.split() and line.split()[0].isdigit()]
    assert printed == expected.tolist(), proc.stdout
    proc = subprocess.run(
        [
            UMAIR,
            "similar",
            "424242",
            "--by",
            "text",
            "--item-features",
            small["features"],
            "--world",
            world.root,
            "--out",
            str(tmp_path / "x.png"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (  # after the line naming the run's log file
        f"umair similar: error: illustration 424242 is not in the item features {small['features']} "
        f"(600 illustrations; run `umair extract` over it first)"
    )
    assert "Traceback" not in proc.stderr and not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------- a trained model (slow)


@pytest.fixture(scope="module")
def trained(small, ray_local):
    from pipelines import train
    from umair.config import MlflowConfig, RayConfig

    root = small["root"]
    mlf = MlflowConfig(tracking_uri=f"sqlite:///{root / 'mlflow.db'}", experiment="t-recommend")
    train.run(
        train.TrainConfig(
            world=small["world"].root,
            item_features=small["features"],
            num_workers=2,
            seed=0,
            epochs=4,
            batch_size=32,
            eval_every_epoch=False,
            checkpoint_dir=str(root / "ray_results"),
            output=str(root / "model"),
            run_name="t-recommend",
            mlflow=mlf,
            ray=RayConfig(num_cpus=4),
        )
    )
    return {**small, "model": str(root / "model"), "mlflow": mlf}


@pytest.mark.slow
def test_recommend_writes_top_k_per_user_and_keeps_up_with_popularity_on_the_test_window(trained):
    from pipelines import recommend
    from umair.config import RayConfig

    out = trained["root"] / "recs"
    # Neighbours of the user's bookmarks only (on this small world the newest / most
    # bookmarked candidates add nothing the model ranks well: bench/RESULTS.md), ranked by
    # expected bookmarks ŷ · exposure share (γ = 1, the default).
    cfg = recommend.RecommendConfig(
        model=trained["model"],
        world=trained["world"].root,
        output=str(out),
        k=20,
        cutoffs=(10, 20),
        candidates=CandidateSettings(recent=0, popular=0, neighbors=20, seeds=20),
        mlflow=trained["mlflow"],
        ray=RayConfig(num_cpus=4),
        run_name="t-recommend",
    )
    summary = recommend.run(cfg)
    # The ranking tables are built once by the driver and mapped by every actor from the
    # object store: each actor's tables are shared pages, none a private copy.
    assert summary["actor_memory"] and summary["shared_tables_mb"] > 0
    for name, mem in summary["actor_memory"].items():
        assert mem["items_private_mb"] == 0, (name, mem)
        assert mem["items_shared_mb"] == pytest.approx(summary["shared_tables_mb"], rel=0.01), (name, mem)
    assert not (out / "runs" / summary["run_id"] / "_reports").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    table = recommend.read_recommendations(str(out))
    assert table.schema.names == ["user_id", "rank", "illust_id", "score"] and table.num_rows == manifest["rows"]
    assert str(table.schema.field("rank").type) == "int32" and str(table.schema.field("score").type) == "float"
    df = table.to_pandas()
    assert df["user_id"].nunique() == 120
    for _, g in df.groupby("user_id"):
        assert g["rank"].tolist() == list(range(1, len(g) + 1)) and len(g) == 20
        assert g["illust_id"].is_unique and (np.diff(g["score"].to_numpy()) <= 0).all()
    # Never an illustration the user bookmarked before the as-of time, never one not yet published.
    inter = trained["world"].interactions.to_pandas()
    import pandas as pd

    split = pd.Timestamp(trained["world"].spec.split, tz="UTC")
    past = inter[(inter["ts"] < split) & (inter["label"] == 1)]
    assert not set(zip(past["user_id"], past["illust_id"])) & set(zip(df["user_id"], df["illust_id"]))
    created = trained["world"].illustrations.to_pandas().set_index("illust_id")["created_at"]
    assert (created.loc[df["illust_id"]] < split).all()

    model_r, pop_r = summary["metrics"]["model"], summary["metrics"]["popularity"]
    assert summary["users_evaluated"] + summary["users_skipped"] == 120 and summary["users_evaluated"] > 80
    # On this small world the model and popularity are close, and which is ahead moves with the
    # last bits of float arithmetic: seeds 0-2 on one machine gave R@20 1.25x popularity's
    # (2026-12-01); seed 0 on an AVX512 machine R@10 1.25x, R@20 1.00x, NDCG@20 1.08x, and with
    # float32 item tables R@10 0.98x (2026-12-02). The default world's demo shows the real gap
    # (R@20 0.068 vs 0.035). Here: never clearly worse than popularity (a broken ranking is far below).
    for key in ("recall_at_10", "recall_at_20", "ndcg_at_20"):
        assert model_r[key] >= 0.9 * pop_r[key], (key, model_r, pop_r)
    run = mlflow.MlflowClient(trained["mlflow"].resolved_uri()).get_run(summary["mlflow_run_id"])
    assert run.data.metrics["recall_at_10"] == pytest.approx(model_r["recall_at_10"])
    assert run.data.metrics["popularity_recall_at_10"] == pytest.approx(pop_r["recall_at_10"])
    assert run.data.params["k"] == "20"
    artifacts = {f.path for f in mlflow.MlflowClient(trained["mlflow"].resolved_uri()).list_artifacts(run.info.run_id)}
    assert {"topk_sample.csv", "recommend_summary.json"} <= artifacts
    # A second run replaces the first: one committed run directory, the manifest names it.
    recommend.run(cfg.model_copy(update={"user_ids": [1, 2, 3]}))
    assert sorted(p.name for p in (out / "runs").iterdir()) == [
        json.loads((out / "manifest.json").read_text())["run_id"]
    ]
    assert set(recommend.read_recommendations(str(out)).column("user_id").to_pylist()) == {1, 2, 3}


@pytest.mark.slow
def test_explain_prints_weights_draws_alpha_per_segment_and_unknown_users_fail_cleanly(trained, tmp_path):
    world = trained["world"]
    conf = {"model": trained["model"], "world": world.root, "out": str(tmp_path / "alpha.png")}
    (tmp_path / "explain.yaml").write_text(yaml.safe_dump(conf))
    proc = subprocess.run(
        [UMAIR, "explain", "7", "--config", str(tmp_path / "explain.yaml")],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "user 7 (segment" in proc.stdout and "ᾱ (Σ_k β_k α)" in proc.stdout
    report = json.loads((tmp_path / "alpha.json").read_text())
    assert sum(report["user"]["alpha_bar"].values()) == pytest.approx(1.0, abs=1e-5)
    assert sum(report["user"]["beta"].values()) == pytest.approx(1.0, abs=1e-5)
    assert set(report["segments"]["alpha"]) == {"all", "style", "content", "tag", "popularity"}
    for seg in report["segments"]["alpha"].values():
        assert set(seg) == {"tsem", "sem", "sty", "meta"} and sum(seg.values()) == pytest.approx(1.0, abs=1e-5)
    with Image.open(tmp_path / "alpha.png") as img:
        assert img.width > 600 and img.height > 250

    proc = subprocess.run(
        [UMAIR, "explain", "99999", "--config", str(tmp_path / "explain.yaml")],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    users = str(Path(world.root) / "users.parquet")
    assert proc.stderr.splitlines()[-1].startswith(
        f"umair explain: error: user 99999 is not in the users table {users}"
    )

    rconf = {
        "model": trained["model"],
        "world": world.root,
        "output": str(tmp_path / "recs"),
        "mlflow": {"tracking_uri": trained["mlflow"].resolved_uri(), "experiment": "t-recommend"},
    }
    (tmp_path / "recommend.yaml").write_text(yaml.safe_dump(rconf))
    proc = subprocess.run(
        [UMAIR, "recommend", "--config", str(tmp_path / "recommend.yaml"), "--user", "3", "--user", "99999"],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip().splitlines()[-1] == f"umair recommend: error: user 99999 is not in the users table {users}"
    )
    assert not (tmp_path / "recs").exists()
