"""The fusion model against hand-computed numbers, every Table-4 variant, gradients and
a small learning check. Expected values are worked out with numpy, not the modules."""

from __future__ import annotations

import doctest
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from sklearn.metrics import roc_auc_score

from umair.model import (
    TABLE4_VARIANTS,
    AttentionUMCM,
    CrossLayer,
    CrossNet,
    LowRankMixtureCrossLayer,
    MeanUMCM,
    ModelConfig,
    MoEUMCM,
    SENetUMCM,
    UmairFPS,
    count_parameters,
    dcn_v2_only,
    l2_embedding_penalty,
    table4_variant,
    table4_variants,
)

# Two users, three modalities of width 2.
V_USER = np.array([[1.0, 0.5], [-1.0, 2.0]])
E = np.array(
    [
        [[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]],
        [[0.5, -1.0], [2.0, 0.0], [0.0, 1.0]],
    ]
)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread is fastest, and immune to a busy shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def t(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def n(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy()


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def set_sen(sen: SENetUMCM) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fixed SEN weights for J = 3, reduction 2 (hidden = 1)."""
    w1, b1 = np.array([[1.0, -2.0, 0.5]]), np.array([0.1])
    w2, b2 = np.array([[1.0], [-1.0], [2.0]]), np.array([0.0, 0.5, -0.5])
    with torch.no_grad():
        sen.fc1.weight.copy_(t(w1))
        sen.fc1.bias.copy_(t(b1))
        sen.fc2.weight.copy_(t(w2))
        sen.fc2.bias.copy_(t(b2))
    return w1, b1, w2, b2


def sen_weights_np(e: np.ndarray, kind: str = "softmax") -> np.ndarray:
    w1, b1, w2, b2 = (
        np.array([[1.0, -2.0, 0.5]]),
        np.array([0.1]),
        np.array([[1.0], [-1.0], [2.0]]),
        np.array([0.0, 0.5, -0.5]),
    )
    z = e.mean(axis=-1)
    s = np.maximum(z @ w1.T + b1, 0.0) @ w2.T + b2
    return softmax(s) if kind == "softmax" else 1.0 / (1.0 + np.exp(-s))


# ---------------------------------------------------------------- UMCM


def test_attention_weights_and_output_match_eq7() -> None:
    att = AttentionUMCM(2, user_proj=False).double()
    out = att(t(V_USER), t(E))
    a = np.einsum("bd,bjd->bj", V_USER, E)  # user 0: [1, 1, 1.5]; user 1: [-2.5, -2, 2]
    np.testing.assert_allclose(a[0], [1.0, 1.0, 1.5])
    alpha = np.exp(a) / np.exp(a).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(n(out.alpha), alpha, rtol=1e-12)
    np.testing.assert_allclose(n(out.v_il), np.einsum("bj,bjd->bd", alpha, E), rtol=1e-12)
    assert count_parameters(att) == 0


def test_attention_with_user_projection_uses_w_v_user() -> None:
    att = AttentionUMCM(2, user_proj=True).double()
    w = np.array([[0.0, 1.0], [2.0, -1.0]])
    with torch.no_grad():
        att.query.weight.copy_(t(w))  # type: ignore[union-attr]
    out = att(t(V_USER), t(E))
    alpha = softmax(np.einsum("bd,bjd->bj", V_USER @ w.T, E))
    np.testing.assert_allclose(n(out.alpha), alpha, rtol=1e-12)
    np.testing.assert_allclose(n(out.v_il), np.einsum("bj,bjd->bd", alpha, E), rtol=1e-12)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_senet_output(kind: str) -> None:
    sen = SENetUMCM(3, reduction=2, weights=kind).double()  # type: ignore[arg-type]
    set_sen(sen)
    out = sen(t(V_USER), t(E))
    alpha = sen_weights_np(E, kind)
    np.testing.assert_allclose(n(out.alpha), alpha, rtol=1e-12)
    np.testing.assert_allclose(n(out.v_il), np.einsum("bj,bjd->bd", alpha, E), rtol=1e-12)


def test_mean_umcm_is_the_plain_mean() -> None:
    out = MeanUMCM()(t(V_USER), t(E))
    np.testing.assert_allclose(n(out.v_il), E.mean(axis=1))
    np.testing.assert_allclose(n(out.alpha), np.full((2, 3), 1 / 3))


def test_moe_gate_and_combination() -> None:
    moe = MoEUMCM(["att", "sen"], d=2, n_modalities=3, att_user_proj=False).double()
    set_sen(moe.experts[1])  # type: ignore[arg-type]
    out = moe(t(V_USER), t(E))
    alpha_att = softmax(np.einsum("bd,bjd->bj", V_USER, E))
    alpha_sen = sen_weights_np(E)
    v_k = np.stack([np.einsum("bj,bjd->bd", a, E) for a in (alpha_att, alpha_sen)], axis=1)  # [B, K, d]
    beta = softmax(np.einsum("bd,bkd->bk", V_USER, v_k))
    np.testing.assert_allclose(n(out.alpha), np.stack([alpha_att, alpha_sen], axis=1), rtol=1e-12)
    np.testing.assert_allclose(n(out.beta), beta, rtol=1e-12)
    np.testing.assert_allclose(n(out.v_il), np.einsum("bk,bkd->bd", beta, v_k), rtol=1e-12)


# ---------------------------------------------------------------- cross network

X0 = np.array([[1.0, -1.0, 0.5], [0.2, 0.3, -2.0]])
XL = np.array([[0.5, 2.0, -1.0], [1.0, 0.0, 1.0]])


def test_full_rank_cross_layer() -> None:
    layer = CrossLayer(3).double()
    w = np.array([[1.0, 0.0, 2.0], [-1.0, 1.0, 0.0], [0.5, 0.5, 0.5]])
    b = np.array([0.1, -0.2, 0.3])
    with torch.no_grad():
        layer.W.copy_(t(w))
        layer.bias.copy_(t(b))
    expected = X0 * (XL @ w.T + b) + XL
    # first row by hand: W x_l = [-1.5, 1.5, 0.75]; + b = [-1.4, 1.3, 1.05]; x0 * that = [-1.4, -1.3, 0.525]
    np.testing.assert_allclose(expected[0], [-1.4 + 0.5, -1.3 + 2.0, 0.525 - 1.0])
    np.testing.assert_allclose(n(layer(t(X0), t(XL))), expected, rtol=1e-12)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_low_rank_mixture_cross_layer(activation: str) -> None:
    rng = np.random.default_rng(0)
    d, r, n_exp = 3, 2, 2
    layer = LowRankMixtureCrossLayer(d, low_rank=r, num_experts=n_exp, activation=activation).double()  # type: ignore[arg-type]
    v, c, u = rng.normal(size=(n_exp, r, d)), rng.normal(size=(n_exp, r, r)), rng.normal(size=(n_exp, d, r))
    bias, gate = rng.normal(size=d), rng.normal(size=(n_exp, d))
    with torch.no_grad():
        for p, x in ((layer.V, v), (layer.C, c), (layer.U, u), (layer.bias, bias), (layer.gate, gate)):
            p.copy_(t(x))
    g = np.tanh if activation == "tanh" else (lambda z: np.maximum(z, 0.0))
    expected = np.zeros_like(XL)
    for b in range(len(XL)):
        weights = softmax(gate @ XL[b])  # one score per expert
        for e in range(n_exp):
            expert = X0[b] * (u[e] @ g(c[e] @ g(v[e] @ XL[b])) + bias)
            expected[b] += weights[e] * expert
        expected[b] += XL[b]
    np.testing.assert_allclose(n(layer(t(X0), t(XL))), expected, rtol=1e-10)


def test_cross_net_depth_zero_is_identity_and_depth_two_chains_layers() -> None:
    x0 = t(X0)
    assert torch.equal(CrossNet(3, 0)(x0), x0)
    net = CrossNet(3, 2, cross_type="full").double()
    l0, l1 = net.layers
    np.testing.assert_allclose(n(net(x0)), n(l1(x0, l0(x0, x0))))
    with pytest.raises(ValueError):
        CrossNet(3, 1, cross_type="diagonal")  # type: ignore[arg-type]


# ---------------------------------------------------------------- the full model

D_SEM, D_STY, D_TSEM = 12, 6, 5


def small_config(**changes: object) -> ModelConfig:
    base = dict(
        n_users=11,
        n_tags=21,
        user_fields={"gender": 3, "age_group": 5},
        item_fields={"created_at": 6, "size": 4, "artist": 9},
        vectors={"sem": D_SEM, "sty": D_STY, "tsem": D_TSEM},
    )
    return ModelConfig(**{**base, **changes})  # type: ignore[arg-type]


def make_batch(cfg: ModelConfig, b: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tags = torch.randint(0, cfg.n_tags, (b, 4), generator=g)
    return {
        "user_id": torch.randint(0, cfg.n_users, (b,), generator=g),
        "user_tags": tags,
        "user_fields": torch.stack([torch.randint(0, n, (b,), generator=g) for n in cfg.user_fields.values()], dim=1),
        "item_fields": torch.stack([torch.randint(0, n, (b,), generator=g) for n in cfg.item_fields.values()], dim=1),
        **{m: torch.randn(b, w, generator=g) for m, w in cfg.vectors.items()},
    }


ID_KEYS = ("user_id", "user_tags", "user_fields", "item_fields")


def fwd(model: UmairFPS, batch: dict[str, torch.Tensor], explain: bool = False):
    """The model on a batch of unpacked ids and vectors (packs the ids first)."""
    packed = model.pack_ids(*(batch.get(k) for k in ID_KEYS))
    vectors = {k: v for k, v in batch.items() if k not in ID_KEYS}
    return model.explain(packed, vectors) if explain else model(packed, vectors)


def test_default_config_is_the_papers_full_model() -> None:
    cfg = ModelConfig(n_users=5, n_tags=5)
    assert cfg.experts == ("att", "sen", "att") and cfg.umcm == "moe"
    assert (cfg.cross_layers, cfg.cross_type, cfg.low_rank, cfg.cross_experts) == (2, "lowrank", 32, 4)
    assert cfg.mlp == (64, 32, 16) and cfg.emb_dim == 8


def test_config_refuses_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValidationError):
        small_config(cros_layers=2)
    with pytest.raises(ValidationError):
        small_config(experts=())
    with pytest.raises(ValidationError):
        small_config(experts=("att", "mlp"))
    with pytest.raises(ValidationError):
        small_config(item_fields={"artist": 0})


def test_forward_shapes_and_weights() -> None:
    cfg = small_config()
    model = UmairFPS(cfg)
    out = fwd(model, make_batch(cfg, 5), explain=True)
    assert model.modality_names == ("tsem", "sem", "sty", "meta")
    assert out.logits.shape == (5,)
    assert out.alpha is not None and out.alpha.shape == (5, 3, 4)
    assert out.beta is not None and out.beta.shape == (5, 3)
    torch.testing.assert_close(out.alpha.sum(-1), torch.ones(5, 3))
    torch.testing.assert_close(out.beta.sum(-1), torch.ones(5))
    torch.testing.assert_close(fwd(model, make_batch(cfg, 5)), out.logits)


def test_tag_padding_is_ignored_by_the_pooling() -> None:
    cfg = small_config()
    model = UmairFPS(cfg).eval()
    batch = make_batch(cfg, 1)
    with torch.no_grad():
        a = fwd(model, {**batch, "user_tags": torch.tensor([[3, 7]])})
        b = fwd(model, {**batch, "user_tags": torch.tensor([[0, 7, 0, 3, 0]])})
    torch.testing.assert_close(a, b)


def test_missing_enabled_modality_is_an_error() -> None:
    cfg = small_config()
    batch = make_batch(cfg, 2)
    del batch["sty"]
    with pytest.raises(ValueError, match="sty"):
        fwd(UmairFPS(cfg), batch)
    with pytest.raises(ValueError, match="item_fields"):
        fwd(UmairFPS(cfg), {**make_batch(cfg, 2), "item_fields": torch.zeros(2, 2, dtype=torch.long)})
    # a disabled modality need not be given
    fwd(UmairFPS(table4_variant(cfg, "w/o STY")), batch)


@pytest.mark.parametrize("name", TABLE4_VARIANTS)
def test_every_variant_runs_with_batch_size_one(name: str) -> None:
    for extra in ({}, {"cross_type": "full", "structure": "parallel", "dropout": 0.1}):
        cfg = table4_variant(small_config(**extra), name)
        model = UmairFPS(cfg)
        batch = make_batch(cfg, 1)
        for train in (True, False):
            model.train(train)
            out = fwd(model, batch, explain=True)
            assert out.logits.shape == (1,) and torch.isfinite(out.logits).all()
            assert (out.alpha is None) == (name == "w/o ALL")


def test_table4_variant_configs() -> None:
    base = small_config()
    variants = table4_variants(base)
    assert list(variants) == list(TABLE4_VARIANTS)
    assert variants["full"] == base
    assert not variants["w/o ALL"].multimodal and variants["w/o ALL"].modalities == ()
    assert variants["w/o STY"].modalities == ("tsem", "sem", "meta")
    assert variants["w/o UMCM"].expert_kinds == ("mean",)
    assert variants["UMCM_SEN"].expert_kinds == ("sen",)
    assert variants["SEN*3"].expert_kinds == ("sen", "sen", "sen")
    assert variants["w/o DCN-V2"].cross_layers == 0
    with pytest.raises(KeyError):
        table4_variant(base, "w/o EVERYTHING")


def test_dcn_v2_only_is_ids_and_metadata_with_the_full_rank_cross() -> None:
    base = small_config(cross_layers=3, mlp=(16, 8))
    dcn = dcn_v2_only(base)
    assert not dcn.multimodal and dcn.cross_type == "full"
    assert (dcn.cross_layers, dcn.mlp) == (3, (16, 8))
    model = UmairFPS(dcn)
    assert all(isinstance(layer, CrossLayer) for layer in model.cross.layers) and len(model.cross.layers) == 3
    assert dcn.model_copy(update={"cross_type": "lowrank"}) == table4_variant(base, "w/o ALL")


def cross_params(width: int, cfg: ModelConfig) -> int:
    r, n_exp = cfg.low_rank, cfg.cross_experts
    return cfg.cross_layers * (n_exp * (r * width + r * r + width * r) + width + n_exp * width)


def test_parameter_counts_of_the_variants() -> None:
    base = small_config()
    n = {name: count_parameters(UmairFPS(cfg)) for name, cfg in table4_variants(base).items()}
    d = base.d
    for fewer in ("w/o ALL", "w/o STY", "w/o SEM", "w/o TSEM", "w/o UMCM", "w/o DCN-V2"):
        assert n[fewer] < n["full"], fewer
    assert n["ATT*4"] > n["ATT*3"] > n["ATT*2"]  # each ATT expert owns a d x d query map
    assert n["SEN*4"] > n["SEN*2"]
    assert n["ATT*3"] - n["ATT*2"] == d * d
    assert n["SEN*3"] - n["SEN*2"] == 22  # SEN over J = 4: fc1 4x2 + 2, fc2 2x4 + 4
    # dropping e_STY removes its projection; the SEN expert then sees J = 3 (fc 3->1->3: 10 params)
    assert n["full"] - n["w/o STY"] == (D_STY + 1) * d + (22 - 10)
    width = UmairFPS(base).x0_width
    assert width == (2 + 2 + 3) * base.emb_dim + 2 * d
    assert n["full"] - n["w/o DCN-V2"] == cross_params(width, base)
    # the paper's parameter-free Eq. 7: ATT experts add nothing, as in Table 4
    paper = small_config(att_user_proj=False)
    counts = {count_parameters(UmairFPS(table4_variant(paper, v))) for v in ("UMCM_ATT", "ATT*2", "ATT*3", "ATT*4")}
    assert len(counts) == 1


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    for cfg in (small_config(), small_config(cross_type="full", structure="parallel")):
        model = UmairFPS(cfg)
        batch = make_batch(cfg, 16)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(fwd(model, batch), torch.rand(16).round())
        (loss + 1e-3 * l2_embedding_penalty(model)).backward()
        for name, p in model.named_parameters():
            assert p.grad is not None, name
            assert p.grad.abs().sum() > 0, name


def test_l2_embedding_penalty_sums_the_tables() -> None:
    model = UmairFPS(small_config())
    tables = [model.user_emb, model.tag_emb, *model.user_field_embs, *model.item_field_embs]
    expected = sum(float((n(m.weight) ** 2).sum()) for m in tables)
    assert l2_embedding_penalty(model).item() == pytest.approx(expected, rel=1e-5)


def train_toy(variant: str) -> float:
    """Half the users bookmark by style (sign of e_STY[0]), half by semantics (sign of
    e_SEM[0]); e_TSEM is noise. Train 200 Adam steps; return the AUC on fresh pairs."""
    torch.manual_seed(0)
    n_users, dim = 41, 8
    base = ModelConfig(
        n_users=n_users, n_tags=2, item_fields={"noise": 4}, vectors={"sem": dim, "sty": dim, "tsem": dim}
    )
    model = UmairFPS(table4_variant(base, variant))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def sample(b: int, g: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        users = torch.randint(1, n_users, (b,), generator=g)
        sem, sty = torch.randn(b, dim, generator=g), torch.randn(b, dim, generator=g)
        label = torch.where(users % 2 == 0, sty[:, 0] > 0, sem[:, 0] > 0).float()
        batch = {
            "user_id": users,
            "user_tags": torch.zeros(b, 1, dtype=torch.long),
            "item_fields": torch.randint(0, 4, (b, 1), generator=g),
            "sem": sem,
            "sty": sty,
            "tsem": torch.randn(b, dim, generator=g),
        }
        return batch, label

    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(200):
        batch, label = sample(128, g)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(fwd(model, batch), label)
        loss = loss + 1e-3 * l2_embedding_penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    batch, label = sample(2000, torch.Generator().manual_seed(2))
    with torch.no_grad():
        scores = fwd(model, batch)
    return float(roc_auc_score(label.numpy(), scores.numpy()))


def test_learns_which_modality_each_user_follows() -> None:
    auc = train_toy("full")
    assert auc > 0.8, auc


def test_toy_problem_needs_the_modalities() -> None:
    """Control: without e_SEM / e_STY the same problem is a coin flip."""
    auc = train_toy("w/o ALL")
    assert auc < 0.6, auc


# ---------------------------------------------------------------- parameter layout


def test_the_flat_layout_has_a_handful_of_optimizer_tensors_and_plain_initialisation() -> None:
    torch.manual_seed(0)
    for cross_type in ("lowrank", "full"):
        model = UmairFPS(small_config(cross_type=cross_type, dropout=0.1))
        # 5 optimizer tensors (table, 2 cross layers, MLP, output layer) besides the UMCM ones
        names = [n for n, _ in model.named_parameters() if not n.startswith(("user_proj", "modality_proj", "umcm"))]
        assert names == [
            "embeddings.weight",
            "cross.layers.0.weight",
            "cross.layers.1.weight",
            "deep.weight",
            "head.flat",
        ]
    with torch.no_grad():
        table = model.embeddings.weight
        assert torch.equal(model.tag_emb.weight[0], torch.zeros(8)) and float(table.std()) == pytest.approx(
            0.1, rel=0.2
        )
        head = model.head
        bound = 1 / head.in_features**0.5
        assert float(head.flat.abs().max()) <= bound and head.weight.shape == (1, head.in_features)
        for j, (_, i) in enumerate(model.deep.shapes):
            assert float(model.deep.weight.split(model.deep._sizes)[2 * j].abs().max()) <= 1 / i**0.5
        d = model.x0_width
        full = CrossLayer(d)
        assert torch.equal(full.bias, torch.zeros(d)) and float(full.W.std()) == pytest.approx((1 / d) ** 0.5, rel=0.1)
        low = LowRankMixtureCrossLayer(d, low_rank=16, num_experts=4)
        assert torch.equal(low.bias, torch.zeros(d))
        for block, fans in ((low.V, 16 + d), (low.C, 32), (low.U, 16 + d), (low.gate, 4 + d)):
            assert float(block.std()) == pytest.approx((2 / fans) ** 0.5, rel=0.15)  # Xavier-normal per expert


def test_dropping_tag_padding_keeps_the_logits_and_the_gradients() -> None:
    cfg = small_config(vectors={})
    torch.manual_seed(0)
    model = UmairFPS(cfg)
    batch = make_batch(cfg, 7)
    tags = torch.zeros(7, 6, dtype=torch.long)  # padding in the middle and at the end; one row has none
    tags[0, 1], tags[0, 4], tags[1, 0], tags[2, 5], tags[3, 2], tags[3, 3], tags[3, 5] = 3, 4, 5, 6, 7, 8, 9
    ids = (batch["user_id"], tags, batch["user_fields"], batch["item_fields"])
    full, compact = model.pack_ids(*ids), model.pack_ids(*ids, drop_tag_padding=True)
    assert full.shape[1] - compact.shape[1] == 6 - 3  # row 3 holds the most tags: 3
    grads = []
    for packed in (full, compact):
        model.zero_grad()
        out = model(packed)
        out.sum().backward()
        grads.append((out.detach(), model.embeddings.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=0, atol=1e-7)
    with pytest.raises(IndexError, match="outside its vocabulary"):
        model.pack_ids(batch["user_id"], tags + 100, batch["user_fields"], batch["item_fields"], drop_tag_padding=True)


def test_id_dropout_trains_the_rows_an_unseen_user_and_a_cold_item_read() -> None:
    """In training a share of rows reads user id 0 / item id 0 (what an unseen user and a
    cold item read when scored), so those rows get gradients; scoring never drops an id."""
    every = 1.0 - 1e-9  # torch.rand < every always (its largest float32 is 1 - 2⁻²⁴)
    cfg = small_config(
        item_fields={"created_at": 6, "illust_id": 9, "artist": 5}, user_id_dropout=every, item_id_dropout=every
    )
    torch.manual_seed(0)
    model = UmairFPS(cfg)
    batch = make_batch(cfg, 64)
    batch["user_id"] = batch["user_id"].clamp(min=1)
    batch["item_fields"][:, 1] = batch["item_fields"][:, 1].clamp(min=1)
    unseen = {**batch, "user_id": torch.zeros_like(batch["user_id"]), "item_fields": batch["item_fields"].clone()}
    unseen["item_fields"][:, 1] = 0
    model.eval()
    as_unseen = fwd(model, unseen)
    assert not torch.allclose(fwd(model, batch), as_unseen)  # scoring reads the ids as given
    model.train()
    torch.testing.assert_close(fwd(model, batch), as_unseen)  # every id dropped: the unseen rows' logits
    model.zero_grad()
    fwd(model, batch).sum().backward()
    grad = model.embeddings.weight.grad
    layout = model.layout
    item_oov = layout.starts[2 + len(cfg.user_fields) + 1]  # block of item field "illust_id", row 0
    assert grad[0].abs().sum() > 0 and grad[item_oov].abs().sum() > 0
    assert grad[1 : cfg.n_users].abs().sum() == 0  # the known ids were not read
    # A share p drops about p of the rows, independently per id.
    half = UmairFPS(small_config(item_fields={"illust_id": 9}, user_id_dropout=0.5, item_id_dropout=0.25))
    packed = half.pack_ids(
        torch.ones(4000, dtype=torch.long), torch.zeros(4000, 1, dtype=torch.long),
        torch.ones(4000, 2, dtype=torch.long), torch.ones(4000, 1, dtype=torch.long),
    )  # fmt: skip
    dropped = half.layout.drop_ids(packed, 0.5, 0.25) != packed
    (user_col, _), (item_col, _) = half.layout.id_columns(packed.shape[1])
    assert (
        abs(dropped[:, user_col].float().mean() - 0.5) < 0.04 and abs(dropped[:, item_col].float().mean() - 0.25) < 0.04
    )
    assert dropped.sum(0)[[c for c in range(packed.shape[1]) if c not in (user_col, item_col)]].sum() == 0
    with pytest.raises(ValidationError, match="no 'illust_id' item field"):
        small_config(item_id_dropout=0.1)


# ---------------------------------------------------------------- docs and imports


def run_docstring_example(obj: object) -> None:
    """Run the ``>>>`` example of ``obj``'s own docstring with empty globals (so it must
    import what it uses, as a reader would); fail with doctest's report."""
    tests = doctest.DocTestFinder(recurse=False).find(obj, globs={})
    assert sum(len(test.examples) for test in tests) >= 3, f"{obj!r} has no docstring example"
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)


def test_the_umair_fps_docstring_example_runs() -> None:
    assert "x_{l+1}  = x_0 ⊙ (W_l x_l + b_l) + x_l" in (UmairFPS.__doc__ or "")
    run_docstring_example(UmairFPS)
