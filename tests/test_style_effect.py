"""The planted painting-style effect (issue #16): the user history as of each row, a model
that reads one refusing rows without it, the attention temperature and the modality norm
as units, and a slow end-to-end check.

Slow check: the default sample world (seed 7) with in-process item features
(random-weight ResNet18 at 48 px, hashed-tag e_TSEM), the demo's model settings and recipe
(pipelines/configs/train.yaml), trained in-process, must serve style-driven users. The
threshold is below the smallest value over 5 model seeds, measured with
``.venv/bin/python bench/style_effect.py fixture --size default --image-size 48 --seeds 0 1 2 3 4
--epochs 5 --model '{"user_history": true, "modality_norm": "l2", "umcm": "moe", "experts": ["att"]}'``
(bench/RESULTS.md, "The painting-style effect"): style-driven users' AUC 0.831-0.858 with the
old training-window history, 0.824-0.853 with the history as of each row (2026-12-03).

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
STYLE_AUC = 0.80  # style-driven users' test AUC with the demo's settings (5 seeds, history as of each row: min 0.824)


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
    u, i, y, ts = rows_of_window(prepared.test_rows)
    scores = score_rows(fitted.model, fitted.lookup, u, i, ts=ts)
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


def _history_batch(liked, disliked, counts=None):
    import torch

    from umair.model.history import HistoryBatch

    n = len(next(iter(liked.values())))
    return HistoryBatch(liked, disliked, torch.zeros(n, 2) if counts is None else counts)


def test_the_history_of_a_row_is_the_users_latest_interactions_strictly_before_it():
    """A row's own label (and anything at or after its time) never enters its history; the
    last K per label, newest first; no time: the whole log; unknown users: empty."""
    import numpy as np
    import torch

    from umair.model.history import InteractionLog, SortedLog

    #            user 1: liked at 10, 20, 30 (item 3, 4, 5), disliked at 20 (item 6); user 2: liked at 15 (item 7)
    log = InteractionLog(
        SortedLog.build(
            user_row=np.array([1, 1, 1, 1, 2]),
            ts=np.array([30, 10, 20, 20, 15]),
            item_row=np.array([5, 3, 4, 6, 7]),
            label=np.array([1, 1, 1, 0, 1]),
        )
    )
    users, ts = torch.tensor([1, 1, 1, 2, 0]), torch.tensor([20, 21, 31, 15, 99])
    items, valid, n = log.recent(users, ts, 2, liked=True)
    got = [[int(x) for x, ok in zip(r, v) if ok] for r, v in zip(items, valid)]
    assert got == [[3], [4, 3], [5, 4], [], []]  # strictly before; K = 2 newest first; user 2 at its own ts: none
    assert n.tolist() == [1, 2, 3, 0, 0]  # the count is not capped at K
    items, valid, n = log.recent(users, None, 5, liked=False)
    assert [[int(x) for x, ok in zip(r, v) if ok] for r, v in zip(items, valid)] == [[6], [6], [6], [], []]
    items, valid, _ = log.recent(torch.tensor([2]), None, 3, liked=True)
    assert items[0, 0] == 7 and valid.tolist() == [[True, False, False]]


def test_the_history_averages_the_vectors_each_item_has(monkeypatch):
    """h_m is the mean of the items that have m (an item without an image adds nothing to
    h_SEM), the same when gathered in small chunks (paper scale: B x K x d floats)."""
    import numpy as np
    import torch

    from umair.model import history as hs

    sem = torch.tensor([[1.0, 1.0], [3.0, 5.0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float16)
    tsem = torch.tensor([[1.0], [2.0], [6.0], [4.0]])
    present = {"sem": torch.tensor([True, True, False, True])}
    log = hs.InteractionLog(
        hs.SortedLog.build(
            np.array([1, 1, 1, 1]), np.array([1, 2, 3, 4]), np.array([0, 1, 2, 3]), np.array([1, 1, 1, 0])
        )
    )
    users, ts = torch.tensor([1, 1, 2]), torch.tensor([9, 3, 9])
    got = hs.history_means(log, {"sem": sem, "tsem": tsem}, present, users, ts, k=8)
    torch.testing.assert_close(got.liked["sem"], torch.tensor([[2.0, 3.0], [2.0, 3.0], [0.0, 0.0]]))  # item 2: no e_SEM
    torch.testing.assert_close(got.liked["tsem"], torch.tensor([[3.0], [1.5], [0.0]]))
    torch.testing.assert_close(got.disliked["tsem"], torch.tensor([[4.0], [0.0], [0.0]]))
    assert got.counts.tolist() == [[3.0, 1.0], [2.0, 0.0], [0.0, 0.0]]
    stats = hs.history_stats(got.counts)
    torch.testing.assert_close(stats[:, 2], torch.tensor([4 / 6, 3 / 4, 1 / 2]))  # smoothed bookmark rate
    monkeypatch.setattr(hs, "HISTORY_GATHER_FLOATS", 8)  # one row per chunk
    again = hs.history_means(log, {"sem": sem, "tsem": tsem}, present, users, ts, k=8)
    torch.testing.assert_close(again.liked["sem"], got.liked["sem"])


def test_user_history_enters_v_user_and_a_model_with_one_refuses_rows_without_it():
    import torch

    from umair.training.lookup import ItemVectors

    model = _history_model(user_history=True, modality_norm="l2").eval()
    packed = model.pack_ids(torch.tensor([1, 2]), torch.tensor([[1], [0]]), None, torch.tensor([[1], [2]]))
    vectors = {"sem": torch.randn(2, 3), "sty": torch.randn(2, 2)}
    with pytest.raises(ValueError, match="reads the user's history"):
        model.explain(packed, vectors)
    empty = ItemVectors(vectors)
    empty.history = _history_batch({m: torch.zeros(2, v.shape[1]) for m, v in vectors.items()},
                                   {m: torch.zeros(2, v.shape[1]) for m, v in vectors.items()})  # fmt: skip
    some = ItemVectors(vectors)
    liked = {m: torch.zeros(2, v.shape[1]) for m, v in vectors.items()}
    liked["sem"][0] = torch.tensor([1.0, -2.0, 0.5])  # user 1 bookmarked something before; user 2 nothing
    some.history = _history_batch(liked, empty.history.disliked)
    before, after = model.explain(packed, empty), model.explain(packed, some)
    assert not torch.allclose(before.logits[0], after.logits[0]) and torch.allclose(before.logits[1], after.logits[1])
    busy = ItemVectors(vectors)
    busy.history = _history_batch(empty.history.liked, empty.history.disliked, torch.tensor([[0.0, 0.0], [5.0, 1.0]]))
    assert not torch.allclose(model.explain(packed, busy).logits[1], before.logits[1])  # the behaviour stats count
    assert {"dislike_proj.sem.weight", "dislike_proj.sty.weight"} <= set(model.state_dict())


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
    assert _history_model().history_names == ()  # off by default: the paper's v_user


def test_the_item_to_history_cosines_are_a_setting():
    """``history_cosines: false`` keeps the history in v_user (and UMCM's query) only: x_0 loses
    the 2 cosines per modality (bench/RESULTS.md: α more user-aware, AUC lower)."""
    import torch

    from umair.training.lookup import ItemVectors

    on = _history_model(user_history=True)
    off = _history_model(user_history=True, history_cosines=False).eval()
    assert on.x0_width - off.x0_width == 2 * 2  # sem, sty; liked and disliked
    packed = off.pack_ids(torch.tensor([1, 2]), torch.tensor([[1], [0]]), None, torch.tensor([[1], [2]]))
    v = ItemVectors({"sem": torch.randn(2, 3), "sty": torch.randn(2, 2)})
    v.history = _history_batch({m: torch.randn(2, x.shape[1]) for m, x in v.items()},
                               {m: torch.zeros(2, x.shape[1]) for m, x in v.items()})  # fmt: skip
    assert torch.isfinite(off.explain(packed, v).logits).all()


def test_the_cosine_gate_scales_each_modalitys_history_cosines_by_its_attention():
    """``cosine_gate``: the same weights give other logits (the cosines enter x_0 as J·ᾱ_m·cos);
    a row whose history is empty has cosines 0 either way, so the gate changes nothing there."""
    import torch

    from umair.training.lookup import ItemVectors

    torch.manual_seed(0)
    plain = _history_model(user_history=True).eval()
    gated = _history_model(user_history=True, cosine_gate=True).eval()
    gated.load_state_dict(plain.state_dict())  # no new weights
    packed = plain.pack_ids(torch.tensor([1, 2]), torch.tensor([[1], [0]]), None, torch.tensor([[1], [2]]))
    v = ItemVectors({"sem": torch.randn(2, 3), "sty": torch.randn(2, 2)})
    liked = {m: torch.randn(2, x.shape[1]) for m, x in v.items()}
    for m in liked:
        liked[m][1] = 0.0  # user 2: no bookmark before the row
    v.history = _history_batch(liked, {m: torch.zeros(2, x.shape[1]) for m, x in v.items()})
    a, b = plain.explain(packed, v).logits, gated.explain(packed, v).logits
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])
