"""Figures people look at (matplotlib, Agg; no Ray, no display needed).

- :func:`contact_sheet`: the paper's Fig. 5 for any catalogue: the query illustration
  first, then its nearest neighbours in one feature space, each captioned with its id,
  its cosine to the query and, when a sample world provides them, its ground-truth
  style and content (matches to the query's in bold green, so a sheet can be judged at
  a glance).
- :func:`attention_plot`: the mean effective modality weight ``ᾱ_j = Σ_k β_k α_{k,j}``
  per user segment (grouped bars, one group per segment), and, when given, the mean
  expert gate ``β_k`` per segment beside it.

Both return the PNG bytes and write them with :mod:`umair.storage` (local or s3://,
all-or-nothing) when ``out`` is given.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from umair import storage


@dataclass(frozen=True)
class SheetItem:
    """One tile: the image (RGB uint8 [H, W, 3], or None when it cannot be read), its
    id, its cosine to the query (None for the query) and ground-truth labels if known."""

    illust_id: int
    image: np.ndarray | None
    score: float | None = None
    labels: Mapping[str, str] | None = None
    note: str = ""


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | None, settings: storage.StorageSettings | None, dpi: int) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    _figure().close(fig)
    data = buf.getvalue()
    if out is not None:
        storage.write_bytes(out, data, settings)
    return data


def contact_sheet(
    query: SheetItem,
    neighbours: Sequence[SheetItem],
    title: str,
    out: str | None = None,
    cols: int = 6,
    settings: storage.StorageSettings | None = None,
    dpi: int = 110,
) -> bytes:
    """Draw the query and its neighbours as a grid (query top-left, framed); see the module docstring."""
    plt = _figure()
    tiles = [query, *neighbours]
    cols = max(1, min(cols, len(tiles)))
    rows = -(-len(tiles) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.9 * rows + 0.5), squeeze=False)
    q_labels = dict(query.labels or {})
    for ax in axes.ravel():
        ax.axis("off")
    for i, item in enumerate(tiles):
        ax = axes.ravel()[i]
        if item.image is not None:
            ax.imshow(item.image, interpolation="nearest")
        else:
            ax.text(
                0.5,
                0.5,
                "image\nunavailable",
                ha="center",
                va="center",
                fontsize=9,
                color="grey",
                transform=ax.transAxes,
            )
        head = f"query {item.illust_id}" if i == 0 else f"#{i} {item.illust_id}  cos {item.score:.3f}"
        ax.set_title(head, fontsize=8, fontweight="bold" if i == 0 else "normal")
        if item.labels:
            lines = []
            for k, v in item.labels.items():
                lines.append((f"{k}: {v}", i > 0 and q_labels.get(k) == v))
            for j, (text, same) in enumerate(lines):
                ax.text(
                    0.5,
                    -0.06 - 0.12 * j,
                    text,
                    ha="center",
                    va="top",
                    fontsize=7,
                    transform=ax.transAxes,
                    color="green" if same else "black",
                    fontweight="bold" if same else "normal",
                )
        if item.note:
            ax.text(
                0.5,
                -0.06 - 0.12 * len(item.labels or {}),
                item.note,
                ha="center",
                va="top",
                fontsize=6,
                transform=ax.transAxes,
                color="grey",
            )
        if i == 0:
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor("crimson")
                spine.set_linewidth(3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(h_pad=3.0)
    return _save(fig, out, settings, dpi)


def attention_plot(
    alpha: Mapping[str, Mapping[str, float]],
    modalities: Sequence[str],
    title: str,
    out: str | None = None,
    users: Mapping[str, int] | None = None,
    beta: Mapping[str, Mapping[str, float]] | None = None,
    experts: Sequence[str] | None = None,
    settings: storage.StorageSettings | None = None,
    dpi: int = 110,
) -> bytes:
    """Grouped bars of mean ᾱ per modality for each segment of ``alpha``
    (``{segment: {modality: mean}}``), and of mean β per expert when ``beta`` is given."""
    plt = _figure()
    segments = list(alpha)
    if not segments:
        raise ValueError("attention_plot: no segment to draw")
    panels = 2 if beta else 1
    fig, axes = plt.subplots(1, panels, figsize=(max(5.0, 1.3 * len(segments) * panels + 2), 3.8), squeeze=False)
    colours = plt.get_cmap("tab10")

    def bars(ax, data: Mapping[str, Mapping[str, float]], names: Sequence[str], ylabel: str, heading: str) -> None:
        width = 0.8 / max(len(names), 1)
        x = np.arange(len(segments))
        for j, name in enumerate(names):
            vals = [float(data.get(s, {}).get(name, np.nan)) for s in segments]
            ax.bar(x + (j - (len(names) - 1) / 2) * width, vals, width, label=name, color=colours(j % 10))
        labels = [f"{s}\n({users[s]} users)" if users and s in users else s for s in segments]
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1)
        ax.axhline(1 / max(len(names), 1), color="grey", lw=0.8, ls="--")
        ax.set_title(heading, fontsize=9)
        ax.legend(fontsize=7, ncol=len(names), loc="upper center", frameon=False)

    bars(axes[0, 0], alpha, list(modalities), "mean ᾱ (Σ_k β_k α_k)", "modality attention ᾱ per segment")
    if beta:
        names = list(experts) if experts else sorted({k for v in beta.values() for k in v})
        bars(axes[0, 1], beta, names, "mean β", "expert gate β per segment")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out, settings, dpi)


def tune_heatmap(rows: list[dict[str, Any]], path: str) -> np.ndarray:
    """K × L grid of the best validation AUC (any trial with that K and L; failed trials
    leave the cell empty), drawn with matplotlib to ``path``. Returns the grid."""
    plt = _figure()
    ks = sorted({r["K"] for r in rows})
    ls = sorted({r["cross_layers"] for r in rows})
    grid = np.full((len(ks), len(ls)), np.nan)
    for r in rows:
        if r["val_auc"] is None or r["status"] == "FAILED":
            continue
        i, j = ks.index(r["K"]), ls.index(r["cross_layers"])
        grid[i, j] = r["val_auc"] if np.isnan(grid[i, j]) else max(grid[i, j], r["val_auc"])
    fig, ax = plt.subplots(figsize=(1.2 * len(ls) + 2.5, 0.9 * len(ks) + 1.8))
    masked = np.ma.masked_invalid(grid)
    finite = grid[np.isfinite(grid)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    im = ax.imshow(masked, cmap="viridis", vmin=lo, vmax=hi if hi > lo else lo + 1e-6, aspect="auto")
    ax.set_xticks(range(len(ls)), [str(v) for v in ls])
    ax.set_yticks(range(len(ks)), [str(v) for v in ks])
    ax.set_xlabel("L: DCN-V2 cross layers")
    ax.set_ylabel("K: UMCM experts")
    ax.set_title("validation AUC (best trial per cell)")
    for i in range(len(ks)):
        for j in range(len(ls)):
            text = "—" if np.isnan(grid[i, j]) else f"{grid[i, j]:.3f}"
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                color="white" if np.isnan(grid[i, j]) or grid[i, j] < (lo + hi) / 2 else "black",
            )
    fig.colorbar(im, ax=ax, label="val AUC")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return grid


def ablation_chart(rows: list[dict[str, Any]], style_segment: str, path: str, title: str) -> None:
    """Horizontal bars: test AUC of every model and its AUC on the style-driven users."""
    plt = _figure()
    names = [r["model"] for r in rows]
    auc = [r["auc"] for r in rows]
    style = [r.get(f"auc_{style_segment}") or float("nan") for r in rows]
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(9, 0.38 * len(rows) + 1.6))
    colors = ["#1f77b4" if r["group"] == "Table 4" else "#7f7f7f" for r in rows]
    ax.barh(y - 0.2, auc, height=0.4, color=colors, label="AUC (all users)")
    ax.barh(y + 0.2, style, height=0.4, color="#ff7f0e", label=f"AUC ({style_segment}-driven users)")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    lo = np.nanmin([*auc, *style]) if rows else 0.5
    ax.set_xlim(max(0.0, min(0.5, lo - 0.02)), 1.0)
    ax.axvline(0.5, color="k", lw=0.5)
    ax.set_xlabel("test-window AUC (blue: UMAIR-FPS Table-4 variants; grey: Table-3 models)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
