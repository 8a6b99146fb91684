"""Items with a missing modality (issue 15): an item without an image (NULL image_uri) or
with an unreadable one keeps a feature row (e_TSEM, NULL e_SEM / e_STY) and its error row;
the contract accepts NULL vectors; standardisation, the user history, UMCM and the
neighbour search use present vectors only; training runs on such items; and with every
modality present nothing changes, bit for bit."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from umair import storage
from umair.config import MlflowConfig, RayConfig, StorageConfig
from umair.contracts import ContractError, validate
from umair.extraction.stages import decode_rows, write_parts
from umair.feature_store import (
    chunk_manifest,
    commit_chunk,
    done_ids,
    list_manifests,
    output_meta,
    read_errors,
    read_features,
    repair,
)
from umair.model import ModelConfig
from umair.model.history import HistoryBatch
from umair.model.item_features import modality_coverage, vector_matrix, vector_stats_of
from umair.model.umcm import MoEUMCM
from umair.neighbors import CandidateGenerator, CandidateSettings, FeatureIndex, MissingVectorError
from umair.training.lookup import ItemVectors

ENC = {"version": "enc-v1", "sem_dim": 4, "sty_dim": 2, "spec": {}, "image_size": 32}
TEXT = {"version": "text-v1", "dim": 3}


def _vectors(rows: list, dim: int) -> pa.FixedSizeListArray:
    """NULL where a row is None (in memory; parquet files never hold such NULLs)."""
    flat = [v if r is not None else 0.0 for r in rows for v in (r if r is not None else [0.0] * dim)]
    mask = pa.array([r is None for r in rows])
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim, mask=mask)


def _batch(ids, ok, reasons, tsem=None, uris=None) -> dict[str, np.ndarray]:
    n = len(ids)
    rng = np.random.default_rng(ids[0])
    stage = ["" if r == "" else ("decode" if r == "corrupt" else "read") for r in reasons]
    out = {
        "illust_id": np.array(ids),
        "image_uri": np.array(
            uris or [None if r == "no_image" else f"x/{i}.png" for i, r in zip(ids, reasons)], object
        ),
        "ok": np.array(ok),
        "stage": np.array(stage, dtype=object),
        "reason": np.array(reasons, dtype=object),
        "error": np.array([f"{r}: detail" if r else "" for r in reasons], dtype=object),
        "sem": rng.standard_normal((n, 4)).astype(np.float32) * np.array(ok)[:, None],
        "sty": rng.standard_normal((n, 2)).astype(np.float32) * np.array(ok)[:, None],
    }
    if tsem is not False:
        out["tsem"] = rng.standard_normal((n, 3)).astype(np.float32)
    return out


def _commit(output: str, run_id: str, seq: int, batch: dict, text: dict | None = TEXT) -> dict:
    meta = output_meta(ENC, text, run_id, "none")
    desc = write_parts(batch, output, run_id, meta["metadata"], StorageConfig(), 5.0)
    manifest = chunk_manifest([{k: v[0] for k, v in desc.items()}], run_id, seq, meta)
    commit_chunk(output, manifest, None, 5.0)
    return {k: v[0] for k, v in desc.items()}


# --------------------------------------------------------------------------- the contract


def test_a_vector_column_may_hold_null_but_not_nan_or_a_wrong_width():
    table = pa.table({"illust_id": pa.array([1, 2, 3], pa.int64()), "sem": _vectors([[1.0, 2.0], None, [3.0, 4.0]], 2)})
    assert validate(table, "item_features", "f.parquet").column("sem").null_count == 1
    bad = pa.table({"illust_id": pa.array([1, 2, 3], pa.int64()), "sem": _vectors([None, [1.0, 2.0], [np.nan, 0]], 2)})
    with pytest.raises(ContractError) as err:
        validate(bad, "item_features", "f.parquet")
    assert str(err.value) == (
        "f.parquet: column 'sem' (row 2): expected finite values in every vector, found illust_id 3: NaN or infinity"
    )
    wide = table.replace_schema_metadata({"umair.sem.dim": "3"})
    with pytest.raises(ContractError, match=r"column 'sem': expected dimension 3 \(file metadata\), found dimension 2"):
        validate(wide, "item_features", "f.parquet")


# --------------------------------------------------------------------------- the extraction writer and the store


def test_decode_rows_marks_a_null_image_uri_no_image_and_an_empty_one_bad_uri(tmp_path):
    out = decode_rows(
        {"illust_id": np.arange(3), "image_uri": np.array([None, float("nan"), ""], dtype=object)},
        16,
        10_000_000,
        1_000_000,
        StorageConfig(),
        5.0,
    )
    assert out["ok"].tolist() == [False, False, False]
    assert out["reason"].tolist() == ["no_image", "no_image", "bad_uri"]


def test_items_without_a_good_image_keep_a_feature_row_with_tsem_and_null_image_vectors(tmp_path):
    output = str(tmp_path / "out")
    reasons = ["", "no_image", "missing", "corrupt", ""]
    batch = _batch([1, 2, 3, 4, 5], [True, False, False, False, True], reasons)
    batch["sty"][4, 0] = np.inf  # an encoder fault: e_STY of item 5 is absent too, with an error
    desc = _commit(output, "run-a", 0, batch)
    assert (desc["features_rows"], desc["partial_rows"], desc["errors_rows"], desc["no_image"]) == (1, 4, 3, 1)
    features = read_features(output)
    by_id = {r["illust_id"]: r for r in features.to_pylist()}
    assert sorted(by_id) == [1, 2, 3, 4, 5]
    assert all(by_id[i]["tsem"] is not None for i in by_id)
    assert [i for i in by_id if by_id[i]["sem"] is None] == [2, 3, 4]
    assert [i for i in by_id if by_id[i]["sty"] is None] == [2, 3, 4, 5]
    np.testing.assert_allclose(by_id[3]["tsem"], batch["tsem"][2], rtol=0)
    errors = {r["illust_id"]: (r["stage"], r["reason"]) for r in read_errors(output).to_pylist()}
    assert errors == {3: ("read", "missing"), 4: ("decode", "corrupt"), 5: ("encode", "non_finite")}
    # no parquet file holds a NULL vector (apache/arrow#35692): absent columns are left out
    for m in list_manifests(output):
        for entry in m["features"]:
            part = storage.read_parquet(os.path.join(output, entry["path"]))
            assert all(part.column(c).null_count == 0 for c in part.column_names)


def test_a_rerun_skips_failed_images_and_retry_failed_supersedes_their_partial_rows(tmp_path):
    output = str(tmp_path / "out")
    _commit(output, "run-a", 0, _batch([1, 2, 3], [True, False, False], ["", "no_image", "missing"]))
    catalogue = str(tmp_path / "catalogue.parquet")
    storage.write_parquet(
        pa.table({"illust_id": pa.array([1, 2, 3], pa.int64()), "image_uri": pa.array(["a", None, "c"])}), catalogue
    )
    manifests = list_manifests(output)
    assert sorted(done_ids(output, manifests, None).tolist()) == [1, 2, 3]  # a plain rerun retries nothing
    # retry_failed: the unreadable image again, not the item whose image_uri is still NULL
    assert sorted(done_ids(output, manifests, None, catalogue).tolist()) == [1, 2]
    retried = _batch([3], [True], [""])
    _commit(output, "run-b", 0, retried)  # the image is readable now
    features = read_features(output)  # no duplicate: the partial row of 3 is superseded
    by_id = {r["illust_id"]: r for r in features.to_pylist()}
    assert sorted(by_id) == [1, 2, 3] and by_id[3]["sem"] is not None
    np.testing.assert_allclose(by_id[3]["sem"], retried["sem"][0], rtol=0)
    assert read_errors(output).num_rows == 0  # 3's error is gone with its complete row
    assert repair(output) == {"manifests_rewritten": 0, "parts_rewritten": 0, "rows_dropped": 0}
    assert sorted(done_ids(output, list_manifests(output), None, catalogue).tolist()) == [1, 2, 3]


# --------------------------------------------------------------------------- model inputs


def test_vector_statistics_are_fitted_over_present_rows_only():
    x = np.array([[1.0, 2.0], [3.0, 6.0], [100.0, 100.0]], np.float32)
    table = pa.table({"illust_id": pa.array([1, 2, 3], pa.int64()), "sem": _vectors([x[0], x[1], None], 2)})
    m, present = vector_matrix(table.column("sem"))
    assert present.tolist() == [True, True, False] and m[2].tolist() == [0.0, 0.0]
    stats = vector_stats_of(table, np.array([1, 2, 3]), ["sem"])["sem"]
    np.testing.assert_allclose(stats.mean, [2.0, 4.0])
    np.testing.assert_allclose(stats.std, [1.0, 2.0])


# --------------------------------------------------------------------------- UMCM


def _e(b: int = 5, j: int = 4, d: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, d, generator=g), torch.randn(b, j, d, generator=g)


@pytest.mark.parametrize("kinds", [("att",), ("sen",), ("mean",), ("att", "sen", "mean")])
def test_umcm_gives_absent_modalities_alpha_zero_and_renormalises_the_rest(kinds):
    torch.manual_seed(0)
    moe = MoEUMCM(kinds, 6, 4)
    v_user, e = _e()
    present = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 1], [0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    out = moe(v_user, e, present)
    alpha = out.alpha  # [B, K, J]
    assert (alpha[~present.unsqueeze(1).expand_as(alpha)] == 0).all()
    sums = alpha.sum(-1)
    torch.testing.assert_close(sums[:4], torch.ones(4, len(kinds)))
    assert (sums[4] == 0).all() and (out.v_il[4] == 0).all()  # no modality: α = 0, v_il = 0
    # the absent modalities' placeholder vectors do not move v_il
    e2 = e.clone()
    e2[~present] = 1e3
    torch.testing.assert_close(moe(v_user, e2, present).v_il, out.v_il)
    loss = moe(v_user.requires_grad_(), e.requires_grad_(), present).v_il.sum()
    loss.backward()
    assert torch.isfinite(e.grad).all() and torch.isfinite(v_user.grad).all()


@pytest.mark.parametrize("kinds", [("att",), ("sen",), ("mean",), ("att", "sen", "mean")])
def test_umcm_with_every_modality_present_is_bit_identical_to_no_mask(kinds):
    torch.manual_seed(0)
    moe = MoEUMCM(kinds, 6, 4)
    v_user, e = _e()
    plain, masked = moe(v_user, e), moe(v_user, e, torch.ones(5, 4, dtype=torch.bool))
    assert torch.equal(plain.v_il, masked.v_il) and torch.equal(plain.alpha, masked.alpha)
    assert torch.equal(plain.beta, masked.beta)


def _model_inputs(cfg: ModelConfig, b: int = 6):
    g = torch.Generator().manual_seed(1)
    ids = {
        "user_id": torch.randint(0, cfg.n_users, (b,), generator=g),
        "user_tags": torch.randint(0, cfg.n_tags, (b, 3), generator=g),
        "user_fields": torch.randint(0, 3, (b, 1), generator=g),
        "item_fields": torch.randint(0, 4, (b, 2), generator=g),
    }
    vectors = {m: torch.randn(b, w, generator=g) for m, w in cfg.vectors.items()}
    return ids, vectors


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(
        n_users=10,
        n_tags=20,
        user_fields={"gender": 3},
        item_fields={"artist": 4, "size": 4},
        vectors={"sem": 5, "sty": 3, "tsem": 4},
        **kw,
    )


@pytest.mark.parametrize("history", [False, True])
def test_the_fusion_model_masks_absent_modalities_and_is_unchanged_when_all_are_present(history):
    from umair.model.fusion import UmairFPS

    torch.manual_seed(0)
    cfg = _cfg(user_history=history)
    model = UmairFPS(cfg).eval()
    ids, vectors = _model_inputs(cfg)
    packed = model.pack_ids(**ids)
    b = len(ids["user_id"])
    full = ItemVectors(vectors, {m: torch.ones(b, dtype=torch.bool) for m in ("sem", "sty")})
    if history:  # every row's user bookmarked (and passed on) something before

        def with_history(v: ItemVectors) -> ItemVectors:
            liked, disliked = {m: x.flip(0) for m, x in vectors.items()}, {m: -x for m, x in vectors.items()}
            v.history = HistoryBatch(liked, disliked, torch.ones(b, 2))
            return v

    else:

        def with_history(v: ItemVectors) -> ItemVectors:
            return v

    vectors = with_history(ItemVectors(vectors))
    full = with_history(full)
    plain, masked = model.explain(packed, vectors), model.explain(packed, full)
    assert torch.equal(plain.logits, masked.logits) and torch.equal(plain.alpha, masked.alpha)
    no_image = torch.tensor([True, False, True, False, True, True])
    absent = with_history(ItemVectors(vectors, {"sem": no_image, "sty": no_image}))
    out = model.explain(packed, absent)
    j = {m: k for k, m in enumerate(model.modality_names)}
    assert (out.alpha[~no_image][:, :, [j["sem"], j["sty"]]] == 0).all()
    torch.testing.assert_close(out.alpha.sum(-1), torch.ones(b, len(cfg.expert_kinds)))
    assert torch.equal(out.logits[no_image], plain.logits[no_image])
    zeroed = {m: torch.where(no_image[:, None], v, torch.zeros_like(v) + 7.0) for m, v in vectors.items()}
    zeroed["tsem"] = vectors["tsem"]
    assert torch.equal(model.explain(packed, with_history(ItemVectors(zeroed, absent.present))).logits, out.logits)


# --------------------------------------------------------------------------- neighbours


def test_items_without_a_vector_are_never_neighbours_or_seeds_in_that_space():
    sem = [[1.0, 0.0], None, [0.9, 0.1], [0.0, 1.0], None]
    table = pa.table({"illust_id": pa.array([10, 20, 30, 40, 50], pa.int64()), "sem": _vectors(sem, 2)})
    index = FeatureIndex.from_table(table, ["sem"], "f.parquet")
    ids, _ = index.similar(10, "sem", 10)
    assert sorted(ids.tolist()) == [30, 40]
    with pytest.raises(MissingVectorError, match=r"illustration 20 has no e_SEM vector in f.parquet"):
        index.similar(20, "sem", 3)
    settings = CandidateSettings(recent=0, popular=0, neighbors=3, spaces=("sem",))
    gen = CandidateGenerator(index, np.ones(5, bool), np.arange(5.0), np.zeros(5), settings)
    assert gen.for_user(np.array([1, 4]), np.zeros(0, np.int64)).rows.tolist() == []  # seeds without e_SEM
    assert sorted(gen.for_user(np.array([1, 0]), np.array([0])).rows.tolist()) == [2, 3]


# --------------------------------------------------------------------------- end to end


def _png(path: Path, seed: int) -> str:
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 24, 3), np.uint8)).save(path, "PNG")
    return str(path)


def test_extraction_over_null_missing_and_broken_images_then_training_on_those_items(ray_local, tiny_world, tmp_path):
    from pipelines import extract
    from umair.training.inputs import prepare
    from umair.training.local import LocalRecipe, fit_local
    from umair.training.lookup import load_lookup
    from umair.training.settings import TrainConfig

    ill = storage.read_parquet(os.path.join(tiny_world.root, "illustrations.parquet"))
    ids = ill.column("illust_id").to_pylist()
    uris = ill.column("image_uri").to_pylist()
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    null_ids, missing_id, broken_id = set(ids[:20:2]), ids[1], ids[3]
    uris = [None if i in null_ids else u for i, u in zip(ids, uris)]
    uris[1], uris[3] = str(tmp_path / "nowhere.png"), str(tmp_path / "broken.png")
    cat = ill.set_column(ill.schema.get_field_index("image_uri"), "image_uri", pa.array(uris, pa.string()))
    catalogue = str(tmp_path / "illustrations.parquet")
    storage.write_parquet(cat, catalogue)
    cfg = extract.ExtractConfig(
        catalogue=catalogue,
        output=str(tmp_path / "features"),
        encoder={"source": None, "spec": {"backbone": "resnet18", "image_size": 32}},
        batch_size=32,
        decode_batch_size=16,
        chunk_rows=40,
        write_batch_rows=40,
        ray=RayConfig(num_cpus=4),
        mlflow=MlflowConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="t-missing"),
    )
    summary = extract.run(cfg)
    n, absent = len(ids), len(null_ids) + 2
    assert summary["rows_ok"] == n - absent and summary["rows_partial"] == absent
    assert summary["rows_by_modality"] == {"sem": n - absent, "sty": n - absent}
    assert summary["rows_no_image"] == len(null_ids) and summary["rows_failed"] == 2
    features = read_features(cfg.output)
    assert sorted(features.column("illust_id").to_pylist()) == sorted(ids)
    no_sem = {
        i for i, v in zip(features.column("illust_id").to_pylist(), features.column("sem").to_pylist()) if v is None
    }
    assert no_sem == null_ids | {missing_id, broken_id}
    errors = {r["illust_id"]: (r["stage"], r["reason"]) for r in read_errors(cfg.output).to_pylist()}
    assert errors == {missing_id: ("read", "missing"), broken_id: ("decode", "not_an_image")}
    again = extract.run(cfg)
    assert again["to_process"] == 0  # failed images are not retried by a plain rerun
    _png(tmp_path / "nowhere.png", 1)  # the missing image arrives
    retried = extract.run(cfg.model_copy(update={"retry_failed": True}))
    assert retried["to_process"] == 2 and retried["rows_ok"] == 1 and retried["rows_failed"] == 1  # not the NULLs
    features = read_features(cfg.output)
    assert features.num_rows == n and features.column("sem").null_count == absent - 1

    tcfg = TrainConfig(
        world=tiny_world.root,
        item_features=cfg.output,
        variant="w/o TSEM",
        checkpoint_dir=str(tmp_path / "rr"),
        output=str(tmp_path / "model"),
    )
    p = prepare(tcfg)
    lookup, _, items = load_lookup(p.space, p.inputs, p.modalities, "cpu", None, p.info.fingerprint)
    coverage = modality_coverage(items)
    assert coverage == {"items": n, "sem": n - absent + 1, "sty": n - absent + 1}
    sem = items.vectors["sem"]
    assert (sem[~items.presence("sem")] == 0).all() and abs(float(sem[items.presence("sem")].mean())) < 0.2
    fitted = fit_local(p, p.model_config, LocalRecipe(epochs=1, batch_size=64))
    assert all(np.isfinite(fitted.epoch_loss))
    rows = torch.as_tensor(np.flatnonzero(~items.presence("sem")))
    lookup.pack_for(fitted.model)
    out = fitted.model.eval().explain(lookup.packed(torch.zeros_like(rows), rows), lookup.item_vectors(rows))
    j = [p.model_config.modalities.index(m) for m in ("sem", "sty")]
    assert (out.alpha[:, :, j] == 0).all() and torch.allclose(out.alpha.sum(-1), torch.ones(()))
