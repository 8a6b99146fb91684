"""Multi-valued categorical fields: a list<string> column (genres, cast, keywords; user
languages...) as a bag of vocabulary ids, mean-pooled into one k-wide field of F_emb(i^O)
(items) or of v_user's input (users)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest
import torch

from umair import contracts
from umair.baselines.inputs import RowInputs
from umair.baselines.rankers import FusionRanker
from umair.errors import FeatureError
from umair.model import ModelConfig, UmairFPS
from umair.model.features import FeatureSettings, FeatureSpace, ItemTable
from umair.training.lookup import Lookup
from umair.training.scoring import score_rows
from umair.training.settings import check_model_overrides
from umair.training.step import StepSettings, train_epoch

T0 = datetime(2024, 1, 1, tzinfo=UTC)
SPLIT = T0 + timedelta(days=30)
N_ITEMS, N_TRAIN, N_USERS = 40, 32, 6


def genres_of(i: int) -> list[str]:
    """Even ids are genre 'A', odd ones 'B'; every third also 'C' (liked or not alike)."""
    return ["A" if i % 2 == 0 else "B"] + (["C"] if i % 3 == 0 else [])


def catalogue() -> tuple[pa.Table, pa.Table, pa.Table]:
    """Illustrations with a genres bag, users with a languages bag, and a training window
    where every user bookmarks exactly the genre-'A' items among ids 1..N_TRAIN."""
    ids = list(range(1, N_ITEMS + 1))
    ill = pa.table(
        {
            "illust_id": pa.array(ids, pa.int64()),
            "image_uri": [f"img/{i}.png" for i in ids],
            "tags": pa.array([["t"]] * N_ITEMS, contracts.TAGS),
            "genres": pa.array([genres_of(i) for i in ids], contracts.TAGS),
            "title": [f"title {i}" for i in ids],
        }
    )
    users = pa.table(
        {
            "user_id": pa.array(range(1, N_USERS + 1), pa.int64()),
            "interest_tags": pa.array([["t"]] * N_USERS, contracts.TAGS),
            "languages": pa.array([["en", "ja"] if u % 2 else ["en"] for u in range(1, N_USERS + 1)], contracts.TAGS),
        }
    )
    pairs = [(u, i) for u in range(1, N_USERS + 1) for i in range(1, N_TRAIN + 1)]
    inter = pa.table(
        {
            "user_id": pa.array([u for u, _ in pairs], pa.int64()),
            "illust_id": pa.array([i for _, i in pairs], pa.int64()),
            "ts": pa.array([T0 + timedelta(minutes=n) for n in range(len(pairs))], contracts.TIMESTAMP),
            "label": pa.array([int("A" in genres_of(i)) for _, i in pairs], pa.int8()),
        }
    )
    return ill, users, inter


def fit_space(**settings: object) -> FeatureSpace:
    ill, users, inter = catalogue()
    return FeatureSpace.fit(ill, users, inter, SPLIT, FeatureSettings(**settings))


def tables(space: FeatureSpace) -> tuple[Lookup, ItemTable]:
    ill, users, _ = catalogue()
    ids = ill.column("illust_id").to_numpy()
    sem = np.random.default_rng(0).normal(size=(len(ids), 2)).astype(np.float32)  # noise: no signal
    items = ItemTable(ids, space.encode_items(ill, ids), {"sem": sem}, {}, bags=space.encode_item_bags(ill, ids))
    return Lookup(space.encode_users(users), items, ["sem"], "cpu"), items


def small_config(space: FeatureSpace) -> ModelConfig:
    return ModelConfig(**space.model_sizes(), vectors={"sem": 2}, d=4, emb_dim=4, mlp=(8,), low_rank=4)


# --------------------------------------------------------------------------- the fitted space


def test_default_bags_are_the_extra_list_columns_and_fit_on_the_training_window() -> None:
    space = fit_space()
    assert list(space.item_bags) == ["genres"]  # not tags (artist tags) nor the string title
    assert list(space.user_bags) == ["languages"]  # not interest_tags
    assert space.item_bags["genres"].tokens.to_pylist() == ["A", "B", "C"]
    sizes = space.model_sizes()
    assert sizes["item_bags"] == {"genres": 4} and sizes["user_bags"] == {"languages": 3}
    assert sizes["max_bag"] == 16
    assert "title" in space.item_fields and "genres" not in space.item_fields


def test_bags_encode_as_padded_ids_and_cold_ids_keep_their_bag() -> None:
    space = fit_space(max_bag=2)
    ill, users, _ = catalogue()
    bags = space.encode_item_bags(ill, np.array([6, 7, 40, 999]))["genres"]
    a, b, c = (space.item_bags["genres"].encode([g])[0] for g in "ABC")
    # 40 never occurs in training (its id is OOV) but its genre is known; 999 is not in the table
    assert bags.tolist() == [[a, c], [b, 0], [a, 0], [0, 0]]
    langs = space.encode_users(users).bags["languages"]
    assert langs.shape == (N_USERS, 2) and (langs[1] == [1, 0]).all()


def test_min_count_applies_to_bag_values() -> None:
    space = fit_space(min_count=11)  # of the 32 training items 16 are 'A', 16 'B', 10 'C' (later items uncounted)
    assert space.item_bags["genres"].tokens.to_pylist() == ["A", "B"]


def test_bags_can_be_chosen_or_switched_off() -> None:
    space = fit_space(item_bags=[], user_bags=[])
    assert space.item_bags == {} and space.user_bags == {}
    assert space.model_sizes()["item_bags"] == {} and space.model_sizes()["user_bags"] == {}
    assert list(fit_space(item_bags=["tags", "genres"]).item_bags) == ["tags", "genres"]


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"item_bags": ["keywords"]}, r"features\.item_bags: column 'keywords' not found in illustrations"),
        ({"item_bags": ["title"]}, r"features\.item_bags: column 'title' of illustrations is string, expected list"),
        ({"user_bags": ["user_id"]}, r"features\.user_bags: column 'user_id' of users is int64, expected list"),
    ],
)
def test_a_bad_bag_column_is_a_feature_error_naming_key_and_column(settings: dict, match: str) -> None:
    with pytest.raises(FeatureError, match=match):
        fit_space(**settings)


def test_the_space_saves_and_loads_its_bags(tmp_path) -> None:
    space = fit_space(max_bag=3)
    uri = str(tmp_path / "space.json")
    space.save(uri)
    back = FeatureSpace.load(uri)
    assert back.model_sizes() == space.model_sizes()
    ill, users, _ = catalogue()
    ids = np.arange(1, N_ITEMS + 1)
    assert (back.encode_item_bags(ill, ids)["genres"] == space.encode_item_bags(ill, ids)["genres"]).all()
    assert (back.encode_users(users).bags["languages"] == space.encode_users(users).bags["languages"]).all()


def test_a_space_saved_before_bags_loads_without_them() -> None:
    old = fit_space().to_dict()
    for key in ("user_bags", "item_bags"):
        del old[key]
        del old["settings"][key]
    del old["settings"]["max_bag"]
    space = FeatureSpace.from_dict(old)
    assert space.item_bags == {} and space.user_bags == {}
    ill, users, _ = catalogue()
    assert space.encode_item_bags(ill, np.array([1, 2])) == {} and space.encode_users(users).bags == {}
    cfg = small_config(space)
    assert cfg.item_bags == {} and cfg.user_bags == {}


def test_bag_sizes_are_data_derived_not_config_keys() -> None:
    for key in ("item_bags", "user_bags", "max_bag"):
        with pytest.raises(ValueError, match="derived from the training data"):
            check_model_overrides({key: {}})


# --------------------------------------------------------------------------- the model


def test_a_bag_is_the_masked_mean_of_its_ids_and_an_empty_bag_is_zero() -> None:
    cfg = ModelConfig(n_users=3, n_tags=2, item_fields={"artist": 3}, item_bags={"genres": 5}, max_bag=3, vectors={})
    model = UmairFPS(cfg)
    genres = torch.tensor([[1, 4, 0], [0, 0, 0], [2, 0, 0]])
    packed = model.pack_ids(
        torch.tensor([1, 2, 0]),
        torch.zeros(3, 1, dtype=torch.long),
        None,
        torch.tensor([[1], [2], [0]]),
        item_bags={"genres": genres},
    )
    assert packed.shape == (3, 1 + 1 + 1 + 3)
    raw = model.embed_packed(packed)  # [B, (2 + M + I) k]
    k = cfg.emb_dim
    table = model.item_bag_embs[0].weight
    assert torch.allclose(raw[0, 3 * k :], (table[1] + table[4]) / 2)
    assert torch.equal(raw[1, 3 * k :], torch.zeros(k))
    assert torch.allclose(raw[2, 3 * k :], table[2])
    assert torch.allclose(raw[:, 2 * k : 3 * k], model.item_field_embs[0](torch.tensor([1, 2, 0])))
    # a narrower bag is padded to L = max_bag: the same packed ids
    same = model.pack_ids(
        torch.tensor([1, 2, 0]),
        torch.zeros(3, 1, dtype=torch.long),
        None,
        torch.tensor([[1], [2], [0]]),
        item_bags={"genres": genres[:, :2]},
    )
    assert torch.equal(same, packed)


def test_pack_ids_checks_the_bags() -> None:
    cfg = ModelConfig(n_users=3, n_tags=2, user_bags={"langs": 3}, item_bags={"genres": 5}, max_bag=2, vectors={})
    model = UmairFPS(cfg)
    uid, tags = torch.tensor([1]), torch.zeros(1, 1, dtype=torch.long)
    ok = {"langs": torch.tensor([[1, 2]])}
    with pytest.raises(ValueError, match=r"item_bags: expected bags \['genres'\].*missing \['genres'\]"):
        model.pack_ids(uid, tags, user_bags=ok)
    with pytest.raises(ValueError, match=r"item_bags\['genres'\]: expected shape \[B=1, L <= 2\]"):
        model.pack_ids(uid, tags, user_bags=ok, item_bags={"genres": torch.tensor([[1, 2, 3]])})
    with pytest.raises(IndexError, match="outside its vocabulary of 5"):
        model.pack_ids(uid, tags, user_bags=ok, item_bags={"genres": torch.tensor([[5]])})
    packed = model.pack_ids(uid, tags, user_bags=ok, item_bags={"genres": torch.tensor([[4]])})
    assert model.embed_packed(packed).shape == (1, 4 * cfg.emb_dim)  # user id, tags, one user bag, one item bag


def test_item_bags_alone_make_the_meta_modality() -> None:
    cfg = ModelConfig(n_users=3, n_tags=2, item_bags={"genres": 5}, vectors={"sem": 2})
    assert cfg.modalities == ("sem", "meta")
    assert ModelConfig(n_users=3, n_tags=2, vectors={"sem": 2}).modalities == ("sem",)


def test_without_bags_the_outputs_are_those_of_the_code_before_bags() -> None:
    """Logits and gradient of a seeded bag-less model, as the code before bag fields computed them."""
    torch.manual_seed(7)
    cfg = ModelConfig(
        n_users=6, n_tags=5, user_fields={"gender": 3}, item_fields={"artist": 4, "size": 3},
        vectors={"sem": 4, "sty": 3, "tsem": 2}, d=4, mlp=(8,), low_rank=4,
    )  # fmt: skip
    model = UmairFPS(cfg).eval()
    g = torch.Generator().manual_seed(3)
    packed = model.pack_ids(
        torch.tensor([1, 2, 0, 5]),
        torch.tensor([[1, 4, 0], [0, 0, 0], [2, 0, 3], [4, 4, 1]]),
        torch.tensor([[1], [2], [0], [1]]),
        torch.tensor([[3, 1], [0, 2], [1, 0], [2, 2]]),
    )
    vec = {
        "sem": torch.randn(4, 4, generator=g),
        "sty": torch.randn(4, 3, generator=g),
        "tsem": torch.randn(4, 2, generator=g),
    }
    out = model.explain(packed, vec)
    out.logits.sum().backward()
    assert packed.tolist() == [
        [1, 7, 10, 6, 12, 17, 19], [2, 6, 6, 6, 13, 14, 20], [0, 8, 6, 9, 11, 15, 18], [5, 10, 10, 7, 12, 16, 20]
    ]  # fmt: skip
    before = [0.0005371980369091034, -0.037812959402799606, -0.0307636559009552, -0.03232350945472717]
    # to float32 rounding: the last bits differ between CPUs (AVX2 vs AVX512 kernels)
    torch.testing.assert_close(out.logits.detach(), torch.tensor(before), rtol=1e-5, atol=1e-7)
    assert model.embeddings.weight.grad.abs().sum().item() == pytest.approx(2.451625108718872, rel=1e-6)


# --------------------------------------------------------------------------- training


def train_and_score_cold(**settings: object) -> tuple[UmairFPS, Lookup, np.ndarray, np.ndarray, np.ndarray]:
    """Train on the catalogue's window (users bookmark the genre-'A' items), then score
    every user against the cold items 33..40 (never in training: their own id is OOV).
    Returns the model, its lookup, the scored user / item rows and the probs [U, 8]."""
    torch.manual_seed(0)
    space = fit_space(**settings)
    lookup, items = tables(space)
    model = UmairFPS(small_config(space))
    ill, _, inter = catalogue()
    u = torch.as_tensor(np.asarray(inter.column("user_id").to_numpy()) - 1)  # user_row of user id n is n - 1
    i = torch.as_tensor(items.rows(inter.column("illust_id").to_numpy()))
    y = torch.as_tensor(inter.column("label").to_numpy().astype(np.float32))
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    gen = torch.Generator().manual_seed(0)
    for epoch in range(12):
        order = torch.randperm(len(u), generator=gen).split(32)
        batches = ({"user_row": u[b], "item_row": i[b], "label": y[b]} for b in order)
        train_epoch(model, model, opt, batches, lookup, StepSettings(lr=0.03, l2_emb=0.0), epoch)
    cold = np.arange(N_TRAIN + 1, N_ITEMS + 1)
    assert (space.encode_items(ill, cold)[:, list(space.item_fields).index("illust_id")] == 0).all()
    users = np.repeat(np.arange(N_USERS), len(cold))
    rows = np.tile(items.rows(cold), N_USERS)
    probs = score_rows(model, lookup, torch.as_tensor(users), torch.as_tensor(rows)).probs.reshape(N_USERS, -1)
    return model, lookup, users, rows, probs


COLD_LIKED = np.array(["A" in genres_of(c) for c in range(N_TRAIN + 1, N_ITEMS + 1)])


def test_a_trained_genre_bag_ranks_a_cold_liked_genre_item_above_a_cold_other_one() -> None:
    model, lookup, users, rows, probs = train_and_score_cold()
    assert probs[:, COLD_LIKED].min() > probs[:, ~COLD_LIKED].max()
    assert probs[:, COLD_LIKED].mean() > 0.8 and probs[:, ~COLD_LIKED].mean() < 0.2
    # the control: without the bag, nothing tells the cold items apart
    *_, blind = train_and_score_cold(item_bags=[])
    assert abs(blind[:, COLD_LIKED].mean() - blind[:, ~COLD_LIKED].mean()) < 0.2
    space = fit_space()

    # the unpacked ids of the lookup pack to the same scores, and umair ablate's rows carry the bags
    ids = lookup.ids(torch.as_tensor(users), torch.as_tensor(rows))
    vectors = lookup.item_vectors(torch.as_tensor(rows))
    with torch.no_grad():
        direct = torch.sigmoid(model(model.pack_ids(**ids), vectors)).numpy().reshape(N_USERS, -1)
    assert np.allclose(direct, probs, atol=1e-6)
    row_inputs = RowInputs.from_tensors(
        ids, vectors, np.zeros(len(rows), np.float32), users, list(space.user_fields), list(space.item_fields)
    )
    ranker = FusionRanker("full", model.cfg)
    ranker.module.load_state_dict(model.state_dict())
    ranker.module.eval()
    with torch.no_grad():
        enc = ranker.encode(row_inputs)
        via_ranker = torch.sigmoid(ranker.forward(enc, torch.arange(len(rows)))).numpy().reshape(N_USERS, -1)
    assert np.allclose(via_ranker, probs, atol=1e-6)


def test_lookup_refuses_a_table_without_the_models_bags() -> None:
    space = fit_space()
    lookup, _ = tables(fit_space(item_bags=[]))
    with pytest.raises(FeatureError, match=r"item bag\(s\) \['genres'\]"):
        lookup.pack_for(UmairFPS(small_config(space)))


def test_the_training_job_path_carries_a_genres_column_into_the_model(tiny_world, tiny_features, tmp_path) -> None:
    """``prepare`` + ``fit_local`` (what ``umair train`` runs, minus Ray) on the tiny world
    with a genres column added: the bag is fitted, sized in the model config, loaded into
    the item table (``load_lookup``) and trained."""
    import os

    from umair import storage
    from umair.training.inputs import prepare
    from umair.training.local import LocalRecipe, fit_local
    from umair.training.settings import TrainConfig

    ill = storage.read_parquet(os.path.join(tiny_world.root, "illustrations.parquet"))
    genres = [genres_of(int(i)) for i in ill.column("illust_id").to_pylist()]
    path = str(tmp_path / "illustrations.parquet")
    storage.write_parquet(ill.append_column("genres", pa.array(genres, contracts.TAGS)), path)
    p = prepare(TrainConfig(world=str(tiny_world.root), illustrations=path, item_features=tiny_features))
    assert p.model_config.item_bags == {"genres": 4} and "meta" in p.model_config.modalities
    fitted = fit_local(p, p.model_config, LocalRecipe(epochs=1, batch_size=64))
    assert all(np.isfinite(fitted.epoch_loss))
    bags = fitted.lookup.ibags["genres"]
    assert bags.shape == (len(fitted.lookup.ifields), 16) and bool((bags[:, 0] > 0).all())
