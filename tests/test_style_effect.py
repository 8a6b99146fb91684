"""The planted painting-style effect (issue #16): the user history, its leave-one-out,
the attention temperature and the modality norm as units, and a slow end-to-end check.

Slow check: the default sample world (seed 7) with in-process item features
(random-weight ResNet18 at 48 px, hashed-tag e_TSEM), the demo's model settings and recipe
(pipelines/configs/train.yaml), trained in-process, must serve style-driven users. The
threshold is below the smallest value over 5 model seeds, measured with
``.venv/bin/python bench/style_effect.py fixture --size default --image-size 48 --seeds 0 1 2 3 4
--epochs 5 --model '{"user_history": true, "modality_norm": "l2", "umcm": "moe", "experts": ["att"]}'``
(bench/RESULTS.md, "The painting-style effect"): style-driven users' AUC 0.831-0.858.

Not asserted, because this fixture does not show it (same 5 seeds): the cost of removing
e_STY for style-driven users (full minus w/o STY: +0.001 ± 0.010; a random-weight e_SEM
separates styles as well as e_STY) and the ᾱ(STY) ratio of style- to content-driven users
(0.97 ± 0.14). The paper's v_user already reaches ~0.85 on style users here; the failure
the fix addresses shows only with the demo's pretext-trained features.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TRAIN_YAML = Path(__file__).resolve().parents[1] / "pipelines" / "configs" / "train.yaml"
STYLE_AUC = 0.80  # style-driven users' test AUC with the demo's settings (5 seeds: min 0.831)


@pytest.fixture(scope="module")
def default_world_features(tmp_path_factory):
    from umair.baselines.sample_features import fixture_item_features
    from umair.sample.world import write_world

    root = tmp_path_factory.mktemp("style_effect")
    world = str(root / "world")
    written = write_world(world, "default", 7, True, progress=False)
    feats = str(root / "features.parquet")
    fixture_item_features(written, feats, image_size=48, tsem_dim=16, seed=0)
    return world, feats


@pytest.mark.slow
def test_the_demo_settings_serve_style_driven_users(default_world_features):
    import os

    from umair import contracts
    from umair.config import load_config
    from umair.training.inputs import prepare
    from umair.training.local import LocalRecipe, fit_local, rows_of_window
    from umair.training.planted import taste_row
    from umair.training.scoring import score_rows, segment_map
    from umair.training.settings import TrainConfig

    world, feats = default_world_features
    demo = load_config(str(TRAIN_YAML), TrainConfig)
    assert demo.model.get("user_history") and demo.model.get("modality_norm") == "l2"
    prepared = prepare(TrainConfig(world=world, item_features=feats, model=demo.model))
    recipe = LocalRecipe(demo.epochs, demo.batch_size * demo.num_workers, demo.lr, demo.l2_emb, seed=0)
    fitted = fit_local(prepared, prepared.model_config, recipe)
    u, i, y = rows_of_window(prepared.test_rows)
    scores = score_rows(fitted.model, fitted.lookup, u, i)
    user_ids = contracts.read_table(prepared.inputs.users, "users").column("user_id").to_numpy()[u.numpy()]
    segments = segment_map(os.path.join(world, "truth", "users.parquet"), "taste", None)
    row = taste_row("full", user_ids, y, scores.probs, scores.weights, list(prepared.model_config.modalities), segments)
    auc = {k: round(v, 3) for k, v in row["auc"].items()}
    assert row["auc"]["style"] >= STYLE_AUC, f"style-driven users' AUC {auc['style']} < {STYLE_AUC}; all: {auc}"
    assert row["spread"]["style"]["users"] > 100  # the default world's 140 style-driven users were scored


def _history_model(**kw):
    import torch

    from umair.model import ModelConfig, UmairFPS

    torch.manual_seed(0)
    cfg = ModelConfig(n_users=4, n_tags=3, item_fields={"artist": 3}, vectors={"sem": 3, "sty": 2}, d=4, **kw)
    return UmairFPS(cfg)


def test_user_history_is_the_mean_of_bookmarked_vectors_and_leaves_the_own_item_out():
    import torch

    from umair.model.history import UserHistory

    h = UserHistory(4, {"sem": 2, "sty": 1})
    uid = torch.tensor([1, 1, 1, 2, 0])
    labels = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0])
    vec = {"sem": torch.tensor([[1.0, 2.0], [3.0, 4.0], [9.0, 9.0], [5.0, 6.0], [7.0, 7.0]]), "sty": torch.ones(5, 1)}
    h.fit(uid, labels, vec)
    got = h(torch.tensor([1, 2, 0, 3]))
    assert got["sem"].tolist() == [[2.0, 3.0], [5.0, 6.0], [0.0, 0.0], [0.0, 0.0]]  # negatives, user 0, no bookmarks
    assert h.count.tolist() == [0.0, 2.0, 1.0, 0.0]
    loo = h.leave_one_out(uid[:4], {m: v[:4] for m, v in vec.items()}, labels[:4])
    # user 1's first bookmark leaves the second one; the negative row keeps the full mean; user 2's only one -> 0
    assert loo["sem"].tolist() == [[3.0, 4.0], [1.0, 2.0], [2.0, 3.0], [0.0, 0.0]]


def test_the_history_fitted_in_chunks_is_the_history_fitted_at_once(monkeypatch):
    """fit_history gathers HISTORY_CHUNK_ROWS bookmarks at a time (paper scale: millions of
    rows x Σ d_m floats); the table is the one a single pass gives, absent vectors included."""
    import numpy as np
    import torch

    from umair.model.history import UserHistory
    from umair.training import lookup as lk

    rng = np.random.default_rng(0)
    n_items, n_rows = 30, 203
    vectors = {"sem": torch.randn(n_items, 3), "sty": torch.randn(n_items, 2)}
    present = {"sem": torch.from_numpy(rng.random(n_items) > 0.3)}
    table = lk.Lookup.__new__(lk.Lookup)
    table.device, table.uid = torch.device("cpu"), torch.arange(6)
    table.vectors, table.present = vectors, present
    u, i = rng.integers(0, 6, n_rows), rng.integers(0, n_items, n_rows)
    y = (rng.random(n_rows) > 0.4).astype(np.float32)

    class Model:
        history = UserHistory(6, {"sem": 3, "sty": 2})

    once = UserHistory(6, {"sem": 3, "sty": 2})
    once.fit(torch.from_numpy(u), torch.from_numpy(y), table.item_vectors(torch.from_numpy(i)))
    monkeypatch.setattr(lk, "HISTORY_CHUNK_ROWS", 17)  # 12 chunks, the last one short
    lk.fit_history(Model, table, u, i, y)
    torch.testing.assert_close(Model.history.mean, once.mean)
    assert torch.equal(Model.history.counts, once.counts) and once.counts[:, 0].sum() < once.counts[:, 1].sum()


def test_user_history_enters_v_user_through_the_modality_projection_and_is_saved():
    import torch

    model = _history_model(user_history=True, modality_norm="l2").eval()
    packed = model.pack_ids(torch.tensor([1, 2]), torch.tensor([[1], [0]]), None, torch.tensor([[1], [2]]))
    vectors = {"sem": torch.randn(2, 3), "sty": torch.randn(2, 2)}
    before = model.explain(packed, vectors)
    model.history.fit(torch.tensor([1, 1]), torch.ones(2), {"sem": torch.randn(2, 3), "sty": torch.randn(2, 2)})
    after = model.explain(packed, vectors)
    assert not torch.allclose(before.logits[0], after.logits[0])  # user 1 has a history now
    assert torch.allclose(before.logits[1], after.logits[1])  # user 2 has none
    assert {"history.mean", "history.count"} <= set(model.state_dict())
    again = _history_model(user_history=True, modality_norm="l2").eval()
    again.load_state_dict(model.state_dict())
    assert torch.allclose(again.explain(packed, vectors).logits, after.logits)


def test_attention_temperature_and_modality_norm_are_settings():
    import torch
    from pydantic import ValidationError

    from umair.model import ModelConfig
    from umair.model.umcm import AttentionUMCM

    with pytest.raises(ValidationError):
        ModelConfig(n_users=2, n_tags=2, att_temperature=0)
    att = AttentionUMCM(2, user_proj=False, temperature=0.5)
    v, e = torch.tensor([[1.0, 0.0]]), torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert torch.allclose(att(v, e).alpha, torch.softmax(torch.tensor([[2.0, 0.0]]), dim=-1))
    assert _history_model().history is None  # off by default: the paper's v_user
