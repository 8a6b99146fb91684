"""The sample world's planted tastes against a trained model and its ablations (issue #16).

:func:`taste_row` turns one model's test-window scores into a row: AUC per planted taste
(``truth/users.parquet`` ``taste``), mean ᾱ(STY) per taste, and over users the std of
ᾱ(STY) and the share of users whose largest ᾱ is their taste's modality
(:func:`umair.metrics.alpha_spread`). :func:`ablation_rows` trains the ``w/o STY`` and
DCN-V2-only rows in this process (:func:`umair.training.local.fit_local`, the same
inputs, step and recipe as the main model). :func:`planted_verdicts` says, in one line
each, whether each planted effect was recovered against :data:`PLANTED_GOALS` (the
issue's goals); :func:`planted_markdown` is the table the demo prints and writes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from umair.metrics import PLANTED_MODALITY, alpha_spread
from umair.training.scoring import segment_report

TASTES = ("style", "content", "tag", "popularity")
PLANTED_GOALS: dict[str, float] = {
    "style_auc": 0.75,  # full model, style-driven users
    "sty_cost": 0.10,  # full minus w/o STY, AUC of style-driven users
    "alpha_ratio": 1.5,  # mean ᾱ(STY) of style-driven / content-driven users
    "style_top_share": 0.60,  # style-driven users whose largest ᾱ is STY
    "overall_auc": 0.78,  # full model, every user
    "over_dcn": 0.05,  # full minus DCN-V2-only, every user
}


def taste_row(
    name: str,
    users: np.ndarray,
    labels: np.ndarray,
    probs: np.ndarray,
    weights: np.ndarray | None,
    modalities: list[str],
    segments: dict[int, str],
) -> dict[str, Any]:
    """``{"model", "auc": {segment: AUC}, "alpha_sty": {segment: mean ᾱ(STY)}, "spread"}``
    of one model's test-window rows (``users`` the user id of each row)."""
    rep = segment_report(users, labels, probs, weights, modalities, segments)
    row: dict[str, Any] = {"model": name, "auc": {k: v["auc"] for k, v in rep.items()}, "users": {}}
    row["users"] = {k: v["users"] for k, v in rep.items()}
    row["alpha_sty"] = {k: v["alpha"].get("sty") for k, v in rep.items()} if weights is not None else {}
    row["spread"] = alpha_spread(users, weights, modalities, segments, PLANTED_MODALITY) if weights is not None else {}
    return row


def evaluated_row(report: dict[str, Any]) -> dict[str, Any]:
    """The ``full`` row of the planted-taste table from ``umair evaluate``'s report
    (``evaluation.json``): AUC, users and ᾱ(STY) per segment, and the spread of ᾱ."""
    seg = report["segments"]
    return {
        "model": "full",
        "auc": {k: v["auc"] for k, v in seg.items()},
        "users": {k: v["users"] for k, v in seg.items()},
        "alpha_sty": {k: v["alpha"].get("sty") for k, v in seg.items()},
        "spread": report.get("alpha_spread") or {},
    }


def ablation_rows(prepared: Any, recipe: Any, segments: dict[int, str], user_ids: np.ndarray) -> list[dict[str, Any]]:
    """The ``w/o STY`` and DCN-V2-only rows: each trained in-process on ``prepared`` with
    ``recipe`` (:class:`umair.training.local.LocalRecipe`) and scored on its test rows
    (``user_ids``: the user id of every users-table row)."""
    from umair.model.settings import dcn_v2_only, table4_variant
    from umair.training.local import fit_local, rows_of_window
    from umair.training.scoring import score_rows

    base = prepared.model_config
    rows, lookup = [], None
    u, i, y, ts = rows_of_window(prepared.test_rows)
    for name, config in (("w/o STY", table4_variant(base, "w/o STY")), ("DCN-V2-only", dcn_v2_only(base))):
        fitted = fit_local(prepared, config, recipe, lookup)
        lookup = fitted.lookup
        scores = score_rows(fitted.model, lookup, u, i, ts=ts)
        rows.append(
            taste_row(name, user_ids[u.numpy()], y, scores.probs, scores.weights, list(config.modalities), segments)
        )
    return rows


def planted_verdicts(full: dict[str, Any], wo_sty: dict[str, Any] | None, dcn: dict[str, Any] | None) -> list[str]:
    """One line per planted effect: recovered or not, with the figure and the goal."""
    g = PLANTED_GOALS
    out = []

    def line(ok: bool, text: str) -> None:
        out.append(f"{'RECOVERED' if ok else 'NOT recovered'}: {text}")

    a = full["auc"]
    style = a.get("style", float("nan"))
    line(style >= g["style_auc"], f"style-driven users served, AUC {style:.3f} (goal >= {g['style_auc']})")
    if wo_sty is not None:
        d = a.get("style", np.nan) - wo_sty["auc"].get("style", np.nan)
        line(d >= g["sty_cost"], f"removing STY costs style-driven users {d:+.3f} AUC (goal >= {g['sty_cost']})")
    al = full.get("alpha_sty") or {}
    if al.get("style") is not None and al.get("content"):
        r = al["style"] / al["content"]
        line(
            r >= g["alpha_ratio"],
            f"ᾱ(STY) of style-driven users {r:.2f}x content-driven's (goal >= {g['alpha_ratio']}x)",
        )
        share = (full.get("spread") or {}).get("style", {}).get("share_planted_top")
        if share is not None:
            line(
                share >= g["style_top_share"],
                f"STY is the largest ᾱ for {share:.0%} of style-driven users (goal >= {g['style_top_share']:.0%})",
            )
    line(a["all"] >= g["overall_auc"], f"overall AUC {a['all']:.3f} (goal >= {g['overall_auc']}; oracle 0.863)")
    if dcn is not None:
        d = a["all"] - dcn["auc"]["all"]
        line(d >= g["over_dcn"], f"full model ahead of DCN-V2-only by {d:+.3f} AUC (goal >= +{g['over_dcn']})")
    return out


def planted_markdown(rows: list[dict[str, Any]]) -> str:
    """The planted-taste table: per taste, users, then AUC (and ᾱ(STY)) of every row."""
    head = "| planted taste | users | " + " | ".join(f"AUC {r['model']}" for r in rows)
    head += " | ᾱ(STY) full | std ᾱ(STY) | largest ᾱ = taste's modality |"
    lines = [head, "|---|---:|" + "---:|" * len(rows) + "---:|---:|---:|"]
    full = rows[0]
    for t in (*TASTES, "all"):
        if t not in full["auc"]:
            continue
        sp = (full.get("spread") or {}).get(t, {})
        share = sp.get("share_planted_top")
        alpha = (full.get("alpha_sty") or {}).get(t)
        cells = [t, str(full["users"].get(t, ""))]
        cells += [f"{r['auc'].get(t, float('nan')):.3f}" for r in rows]
        cells += [
            "–" if alpha is None else f"{alpha:.3f}",
            f"{sp['std']['sty']:.3f}" if sp.get("std") else "–",
            "–" if share is None else f"{share:.0%}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def style_effect(
    world: str,
    item_features: str,
    model: dict[str, Any],
    recipe: Any,
    split: str | None = None,
    baseline: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The style effect of the model settings ``model`` (:class:`ModelConfig` overrides) on
    one sample world, trained in-process (:func:`umair.training.local.fit_local`) with
    ``recipe``: the full model's row and its ``w/o STY`` row (:func:`taste_row`), and
    ``margin`` = style-driven users' AUC full minus w/o STY, ``alpha_ratio`` = mean
    ᾱ(STY) of style-driven / content-driven users, ``style_top_share``. With ``baseline``
    (other overrides, e.g. ``{}``: the paper's v_user) its row too, and ``over_baseline`` =
    style-driven users' AUC full minus baseline."""
    import os

    from umair import contracts
    from umair.model.settings import table4_variant
    from umair.training.inputs import prepare
    from umair.training.local import fit_local, rows_of_window
    from umair.training.scoring import score_rows, segment_map
    from umair.training.settings import TrainConfig

    prepared = prepare(TrainConfig(world=world, item_features=item_features, split=split, model=model))
    segments = segment_map(os.path.join(world, "truth", "users.parquet"), "taste", None)
    user_ids = contracts.read_table(prepared.inputs.users, "users").column("user_id").to_numpy()
    u, i, y, ts = rows_of_window(prepared.test_rows)
    rows, lookup = {}, None
    configs = {name: table4_variant(prepared.model_config, name) for name in ("full", "w/o STY")}
    if baseline is not None:
        base = prepare(TrainConfig(world=world, item_features=item_features, split=split, model=baseline))
        configs["baseline"] = base.model_config
    for name, config in configs.items():
        fitted = fit_local(prepared, config, recipe, lookup)
        lookup = fitted.lookup
        s = score_rows(fitted.model, lookup, u, i, ts=ts)
        rows[name] = taste_row(name, user_ids[u.numpy()], y, s.probs, s.weights, list(config.modalities), segments)
    full = rows["full"]
    extra = {"over_baseline": full["auc"]["style"] - rows["baseline"]["auc"]["style"]} if baseline is not None else {}
    return {
        **extra,
        "rows": rows,
        "margin": full["auc"]["style"] - rows["w/o STY"]["auc"]["style"],
        "alpha_ratio": full["alpha_sty"]["style"] / full["alpha_sty"]["content"],
        "style_top_share": full["spread"]["style"]["share_planted_top"],
        "style_auc": full["auc"]["style"],
    }
