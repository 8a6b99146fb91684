"""``umair explain USER_ID``: how the model weighs the modalities for one user, and for
every user segment of the test window.

For the user: the UMCM weights over the illustrations they are ranked on now — their
candidate set as ``umair recommend`` builds it (``over: candidates``, default) or their
test-window impressions (``over: impressions``) — averaged: per expert ``k`` the gate
``β_k`` and ``α_{k,j}`` per modality ``j`` (paper Eq. 6-7), and the effective weight
``ᾱ_j = Σ_k β_k α_{k,j}``; then their top recommendations with each one's ᾱ.

For the whole test window ``[T, end)``: every logged impression is scored, and the mean
ᾱ per modality and mean β per expert per user segment (each user's impressions averaged
first, then users: :func:`umair.metrics.mean_attention`, the statistic ``umair
evaluate`` reports; segments from :func:`pipelines.evaluate.segment_map`, by default a
sample world's planted ``taste`` in ``truth/users.parquet``, else one segment ``all``)
are drawn as a PNG (:func:`umair.plots.attention_plot`) and written as JSON beside it,
with how user-aware ᾱ is (:func:`umair.metrics.alpha_spread`): per segment the std over
users of each user's mean ᾱ_j, and the share of users whose largest ᾱ is the modality
of their planted taste (sample world: style -> STY, content -> SEM, tag -> TSEM), which
is also printed next to the explained user.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from umair import storage
from umair.config import Settings, StorageConfig
from umair.errors import FeatureError
from umair.metrics import PLANTED_MODALITY
from umair.model.interactions import window
from umair.neighbors import CandidateSettings
from umair.recommender import as_of_us

TAG = "[explain]"


class ExplainConfig(Settings):
    """Settings of ``umair explain`` (see pipelines/configs/explain.yaml)."""

    model: str = Field("outputs/demo/model", description="a model directory written by umair train")
    world: str | None = Field(
        "outputs/demo/world", description="a sample world: tables and truth/users.parquet segments"
    )
    illustrations: str | None = None
    users: str | None = None
    interactions: str | None = None
    item_features: str | None = Field(None, description="default: the features the model was trained on")
    split: str | None = Field(None, description="as-of time / start of the test window; default: the model's split")
    end: str | None = Field(None, description="end of the test window (exclusive)")
    over: Literal["candidates", "impressions"] = Field(
        "candidates", description="the user's items to average α, β over"
    )
    candidates: CandidateSettings = CandidateSettings()
    top: int = Field(5, ge=0, description="top recommendations to list with their ᾱ")
    segments: str | None = Field(
        None, description="table with user_id and segment_column; default: WORLD/truth/users.parquet"
    )
    segment_column: str = "taste"
    batch_size: int = Field(8192, ge=1)
    out: str = Field("outputs/demo/explain/attention_by_segment.png", description="α-per-segment PNG (JSON beside it)")
    storage: StorageConfig = StorageConfig()


def expert_names(kinds: tuple[str, ...]) -> list[str]:
    """``att0``, ``sen1``, ...: the UMCM experts in β order."""
    return [f"{k}{i}" for i, k in enumerate(kinds)]


def attention_of_rows(
    model: Any,
    lookup: Any,
    user_rows: np.ndarray,
    item_rows: np.ndarray,
    batch_size: int = 8192,
    as_of: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """σ(logit) [N], α [N, K, J] and β [N, K] of (user row, item row) pairs, a user history
    (if the model reads one) cut at ``as_of`` (the interactions' int64 time; None: now)."""
    import torch

    probs, alphas, betas = [], [], []
    model.eval()
    lookup.pack_for(model)
    with torch.no_grad():
        for s in range(0, len(user_rows), batch_size):
            u = torch.as_tensor(user_rows[s : s + batch_size])
            i = torch.as_tensor(item_rows[s : s + batch_size])
            ts = None if as_of is None else torch.full((len(u),), as_of, dtype=torch.int64)
            out = model.explain(lookup.packed(u, i), lookup.row_vectors(u, i, ts))
            if out.alpha is None:
                raise FeatureError("the model has no modality attention (variant 'w/o ALL': no e_SEM, e_STY, e_TSEM)")
            probs.append(torch.sigmoid(out.logits).float().numpy())
            alphas.append(out.alpha.float().numpy())
            betas.append(out.beta.float().numpy())
    if not probs:
        return np.zeros(0), np.zeros((0, 0, 0)), np.zeros((0, 0))
    return np.concatenate(probs), np.concatenate(alphas), np.concatenate(betas)


def explain_user(ctx: Any, user_id: int, cfg: ExplainConfig) -> dict[str, Any]:
    """α, β and ᾱ of one user averaged over their candidates (or test impressions), and their top items."""
    from umair.metrics import modality_weights

    r = ctx.user_row(user_id)
    if cfg.over == "candidates":
        rows = ctx.candidates(user_id).rows
    else:
        test = window(ctx.interactions, start=ctx.inputs.split, end=cfg.end)
        mine = test.filter(pa.array(test.column("user_id").to_numpy() == user_id))
        rows = ctx.index.rows(mine.column("illust_id").to_numpy())
        rows = np.unique(rows[rows >= 0])
    if len(rows) == 0:
        raise FeatureError(
            f"user {user_id} has no {cfg.over} to explain over "
            f"({'no test-window impressions in ' + ctx.inputs.interactions if cfg.over == 'impressions' else 'empty candidate set'})"
        )
    probs, alpha, beta = attention_of_rows(
        ctx.saved.model, ctx.lookup, np.full(len(rows), r, np.int64), rows, cfg.batch_size, as_of_us(ctx.inputs.split)
    )
    weights = modality_weights(alpha, beta)
    modalities = list(ctx.saved.config.modalities)
    experts = expert_names(ctx.saved.config.expert_kinds)
    order = np.lexsort((ctx.index.illust_ids[rows], -probs))[: cfg.top]
    return {
        "user_id": int(user_id),
        "over": cfg.over,
        "items": int(len(rows)),
        "cold_start": ctx.is_cold(r),
        "alpha_bar": dict(zip(modalities, weights.mean(axis=0).tolist())),
        "beta": dict(zip(experts, beta.mean(axis=0).tolist())),
        "alpha_per_expert": {
            e: dict(zip(modalities, alpha[:, k, :].mean(axis=0).tolist())) for k, e in enumerate(experts)
        },
        "top": [
            {
                "illust_id": int(ctx.index.illust_ids[rows[j]]),
                "score": float(probs[j]),
                "alpha_bar": dict(zip(modalities, weights[j].tolist())),
            }
            for j in order
        ],
    }


def segment_attention(ctx: Any, cfg: ExplainConfig, segments: dict[int, str]) -> dict[str, Any]:
    """Mean ᾱ per modality and mean β per expert for each segment over the test window's impressions."""
    from umair.metrics import alpha_spread, mean_attention, modality_weights

    test = window(ctx.interactions, start=ctx.inputs.split, end=cfg.end)
    u_rows = ctx.user_table.rows(test.column("user_id").to_numpy())
    i_rows = ctx.index.rows(test.column("illust_id").to_numpy())
    ok = (u_rows >= 0) & (i_rows >= 0)
    if not ok.any():
        raise FeatureError(
            f"{ctx.inputs.interactions}: no test-window impression (ts >= {ctx.inputs.split}) to explain"
        )
    as_of = as_of_us(ctx.inputs.split)
    _, alpha, beta = attention_of_rows(ctx.saved.model, ctx.lookup, u_rows[ok], i_rows[ok], cfg.batch_size, as_of)
    users = ctx.user_table.user_ids[u_rows[ok]]
    modalities = list(ctx.saved.config.modalities)
    experts = expert_names(ctx.saved.config.expert_kinds)
    weights = modality_weights(alpha, beta)
    a = mean_attention(users, weights, modalities, segments)
    b = mean_attention(users, beta, experts, segments)
    return {
        "rows": int(ok.sum()),
        "dropped_rows": int((~ok).sum()),
        "modalities": modalities,
        "experts": experts,
        "users": {s: int(v["users"]) for s, v in a.items()},
        "alpha": {s: {m: v[m] for m in modalities} for s, v in a.items()},
        "beta": {s: {e: v[e] for e in experts} for s, v in b.items()},
        "alpha_spread": alpha_spread(users, weights, modalities, segments),
    }


def _print_user(res: dict[str, Any], segment: str | None, ctx: Any) -> None:
    who = f"user {res['user_id']}" + (f" (segment {segment})" if segment else "")
    cold = (
        "; not seen in training: scored from profile and interest tags (id embedding = OOV)"
        if res["cold_start"]
        else ""
    )
    print(f"{TAG} {who}: UMCM weights averaged over {res['items']} {res['over']} (as of {ctx.inputs.split}){cold}")
    mods = list(res["alpha_bar"])
    print(f"  {'':<14}" + "".join(f" {m:>7}" for m in mods))
    print(f"  {'ᾱ (Σ_k β_k α)':<14}" + "".join(f" {res['alpha_bar'][m]:>7.3f}" for m in mods))
    planted = PLANTED_MODALITY.get(segment or "")
    if segment:
        top = max(mods, key=lambda m: res["alpha_bar"][m])
        verdict = f"largest ᾱ: {top}" + (
            f" ({'=' if top == planted else '≠'} the planted taste's {planted})" if planted else ""
        )
        print(
            f"  planted taste: {segment}" + (f" (modality {planted})" if planted else " (no modality)") + f"; {verdict}"
        )
    for e, row in res["alpha_per_expert"].items():
        head = f"α {e} β={res['beta'][e]:.3f}"
        print(f"  {head:<14}" + "".join(f" {row[m]:>7.3f}" for m in mods))
    if res["top"]:
        print(f"  top {len(res['top'])} by score:")
        for t in res["top"]:
            print(
                f"    {t['illust_id']:>8}  score {t['score']:.3f}  ᾱ "
                + " ".join(f"{m}={v:.2f}" for m, v in t["alpha_bar"].items())
            )


def run(cfg: ExplainConfig, user_id: int) -> dict[str, Any]:
    """Explain ``user_id``, draw the α-per-segment plot of the test window; return both."""
    from umair.plots import attention_plot
    from umair.recommender import load_context
    from umair.training.inputs import eval_inputs_of
    from umair.training.model_io import load_model
    from umair.training.scoring import segment_map

    settings = cfg.storage.to_settings()
    saved = load_model(cfg.model, settings)
    inputs, default_segments = eval_inputs_of(cfg, saved, settings)
    ctx = load_context(cfg.model, inputs, cfg.candidates, settings)
    ctx.user_row(int(user_id))  # an unknown user fails here, before any scoring
    seg_uri = cfg.segments or default_segments
    segments = segment_map(seg_uri, cfg.segment_column, settings)
    user = explain_user(ctx, int(user_id), cfg)
    _print_user(user, segments.get(int(user_id)), ctx)
    seg = segment_attention(ctx, cfg, segments)
    print(
        f"{TAG} test window from {inputs.split}: mean ᾱ per segment over {seg['rows']} impressions"
        + (
            f" (segments: {seg_uri}, column {cfg.segment_column})"
            if segments
            else " (no segments table: one segment 'all')"
        )
    )
    print(
        f"  {'segment':<12} {'users':>5}"
        + "".join(f" {m:>7}" for m in seg["modalities"])
        + "  |"
        + "".join(f" {'β ' + e:>7}" for e in seg["experts"])
    )
    for s, vals in seg["alpha"].items():
        print(
            f"  {s:<12} {seg['users'][s]:>5}"
            + "".join(f" {vals[m]:>7.3f}" for m in seg["modalities"])
            + "  |"
            + "".join(f" {seg['beta'][s][e]:>7.3f}" for e in seg["experts"])
        )
    for s, sp in seg["alpha_spread"].items():
        share = sp["share_planted_top"]
        print(
            f"  ᾱ spread {s:<12} std over users "
            + " ".join(f"{m}={v:.3f}" for m, v in sp["std"].items())
            + ("" if share is None else f"; largest ᾱ = planted modality for {share:.0%}")
        )
    title = f"{cfg.model} ({saved.meta.get('variant', 'full')}): test window from {inputs.split[:10]}"
    attention_plot(seg["alpha"], seg["modalities"], title, cfg.out, seg["users"], seg["beta"], seg["experts"], settings)
    report = {
        "user": user,
        "segments": seg,
        "segments_source": seg_uri,
        "model": cfg.model,
        "as_of": inputs.split,
        "plot": cfg.out,
    }
    json_out = cfg.out.rsplit(".", 1)[0] + ".json"
    storage.write_bytes(json_out, json.dumps(report, indent=2, default=str).encode(), settings)
    print(f"{TAG} plot: {cfg.out} (numbers: {json_out})")
    return report


def register(sub: Any) -> None:
    """Add ``umair explain`` to the CLI."""
    import os

    from umair.config import load_with_flags

    def handler(args: Any) -> int:
        keys = ("model", "world", "item_features", "out", "over")
        cfg = load_with_flags(args.config, ExplainConfig, args, keys)
        run(cfg, args.user_id)
        return 0

    default = "pipelines/configs/explain.yaml"
    p = sub.add_parser("explain", help="modality attention α and expert gate β of a user, and α per user segment (PNG)")
    p.add_argument("user_id", type=int, help="the user to explain")
    p.add_argument(
        "--config", default=default if os.path.exists(default) else None, help=f"settings YAML (default: {default})"
    )
    p.add_argument("--model", help="model directory written by umair train (overrides the config)")
    p.add_argument("--world", help="sample world: tables and truth segments (overrides the config)")
    p.add_argument("--item-features", help="item-features table (overrides the config)")
    p.add_argument("--over", choices=["candidates", "impressions"], help="average the user's weights over these items")
    p.add_argument("--out", help="α-per-segment PNG path (overrides the config)")
    p.set_defaults(func=handler)
