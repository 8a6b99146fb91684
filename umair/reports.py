"""Result tables as text (markdown, CSV) for ``umair tune`` and ``umair ablate``."""

from __future__ import annotations

import csv
import io
import math
from typing import Any

TUNE_COLUMNS = [
    "trial_id",
    "status",
    "experts",
    "K",
    "cross_layers",
    "lr",
    "d",
    "epochs",
    "best_epoch",
    "val_auc",
    "val_logloss",
    "val_gauc",
    "mlflow_run_id",
    "error",
]


def results_markdown(rows: list[dict[str, Any]]) -> str:
    """The ``umair tune`` results table (one row per trial, :data:`TUNE_COLUMNS`) as markdown;
    ``val_auc`` is the trial's best epoch's (``best_epoch``), the one its saved model holds."""

    def fmt(v: Any) -> str:
        if v is None or v == "":
            return ""
        if isinstance(v, float):  # 4 decimals; a learning rate like 1e-05 or 1e+30 in short form
            return f"{v:.4g}" if v != 0 and not 1e-3 <= abs(v) < 1e4 else f"{v:.4f}"
        return str(v)

    head = "| " + " | ".join(TUNE_COLUMNS) + " |\n|" + "---|" * len(TUNE_COLUMNS) + "\n"
    return head + "".join(
        "| " + " | ".join(fmt(r.get(c)).replace("|", "/") for c in TUNE_COLUMNS) + " |\n" for r in rows
    )


def results_csv(rows: list[dict[str, Any]]) -> str:
    """The ``umair tune`` results table as CSV."""
    return csv_text(rows, TUNE_COLUMNS)


def fmt_cell(v: Any, digits: int = 4) -> str:
    """A table cell: ``–`` for missing or non-finite, floats to ``digits`` places, ints with separators."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def ablation_columns(segment_names: list[str]) -> list[str]:
    """The columns of ``ablate.csv``."""
    return [
        "group",
        "model",
        "source",
        "auc",
        "logloss",
        "gauc",
        *[f"auc_{s}" for s in segment_names],
        "parameters",
        "samples_per_s",
        "train_s",
        "final_train_loss",
    ]


def csv_text(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """``rows`` as CSV with these ``columns`` (other keys ignored, None written empty)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: r.get(c) for c in columns})
    return buf.getvalue()


def ablation_markdown(
    rows: list[dict[str, Any]], segment_names: list[str], header: list[str], checks: dict[str, Any]
) -> str:
    """``ablate.md``: the Table-4 and Table-3 rows, then the planted-effect checks."""
    cols = [
        ("model", "model"),
        ("source", "source"),
        ("auc", "AUC"),
        ("logloss", "logloss"),
        ("gauc", "GAUC"),
        *[(f"auc_{s}", f"AUC {s} users") for s in segment_names],
        ("parameters", "parameters"),
        ("samples_per_s", "train samples/s"),
        ("train_s", "train s"),
    ]
    lines = ["# UMAIR-FPS: Tables 3 and 4 on one dataset and one split", "", *header, ""]
    for group in ("Table 4", "Table 3"):
        members = [r for r in rows if r["group"] == group]
        if not members:
            continue
        lines += [
            f"## {group}",
            "",
            "| " + " | ".join(t for _, t in cols) + " |",
            "|" + "|".join("---" if k in ("model", "source") else "---:" for k, _ in cols) + "|",
        ]
        for r in members:
            cells = []
            for k, _ in cols:
                v = r.get(k)
                cells.append(fmt_cell(v, 1 if k in ("samples_per_s", "train_s") else 4))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if checks:
        lines += ["## Planted effects", ""]
        for k, c in checks.items():
            lines.append(f"- {k}: {c['text']} → {'met' if c['met'] else 'NOT met'}")
        lines.append("")
    return "\n".join(lines)


def demo_summary(
    steps_s: dict[str, float],
    wall_s: float,
    outputs: dict[str, str],
    planted: dict[str, Any] | None,
    ranking: dict[str, dict[str, float]] | None,
    report_path: str,
    mlflow_uri: str | None,
) -> list[str]:
    """The demo's final screen (10–20 lines): what ran and for how long, where its outputs
    are, the planted-taste AUCs of the model beside its ablations with how many planted
    effects were recovered, Recall@K / NDCG@K against popularity, the report and the
    MLflow UI command. ``planted``: :func:`pipelines.demo.planted_section`'s result
    (``rows`` full, w/o STY, DCN-V2-only; ``verdicts``); ``ranking``: ``umair recommend``'s
    ``metrics`` (``model`` and ``popularity``, flat ``recall_at_K`` / ``ndcg_at_K``)."""
    lines = ["", "== summary =="]
    lines.append(f"ran in {wall_s:.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in steps_s.items()))
    lines.append("outputs: " + ", ".join(f"{k} {v}" for k, v in outputs.items()))
    if planted:
        rows = planted["rows"]
        full = rows[0]
        lines.append(
            "test AUC per planted taste: " + " | ".join(r["model"] for r in rows) + " (ᾱ(STY) of the full model)"
        )
        for taste in ("style", "content", "tag", "popularity", "all"):
            if taste not in full["auc"]:
                continue
            aucs = " | ".join(fmt_cell(r["auc"].get(taste), 3) for r in rows)
            alpha = (full.get("alpha_sty") or {}).get(taste)
            who = f"{taste} ({fmt_cell(full['users'].get(taste))} users)"
            lines.append(f"  {who:<26} {aucs}" + ("" if alpha is None else f"  ᾱ(STY) {alpha:.3f}"))
        verdicts = planted["verdicts"]
        missed = [v.split(": ", 1)[1] for v in verdicts if v.startswith("NOT")]
        lines.append(f"planted effects recovered: {len(verdicts) - len(missed)} of {len(verdicts)}")
        lines += [f"  missed: {m}" for m in missed]
    if ranking:
        model, pop = ranking["model"], ranking["popularity"]
        ks = sorted(int(k.rsplit("_", 1)[1]) for k in model if k.startswith("recall_at_"))
        if ks:
            k = ks[-1]
            lines.append(
                f"top-{k} on the test window: Recall@{k} {model[f'recall_at_{k}']:.4f} vs popularity's "
                f"{pop[f'recall_at_{k}']:.4f}; NDCG@{k} {model[f'ndcg_at_{k}']:.4f} vs {pop[f'ndcg_at_{k}']:.4f}"
            )
    lines.append(f"report: {report_path} (open it in a browser)")
    if mlflow_uri:
        lines.append(f"MLflow UI: mlflow ui --backend-store-uri {mlflow_uri}  (then http://127.0.0.1:5000)")
    return lines
