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
            ax.text(0.5, 0.5, "image\nunavailable", ha="center", va="center", fontsize=9, color="grey",
                    transform=ax.transAxes)
        head = f"query {item.illust_id}" if i == 0 else f"#{i} {item.illust_id}  cos {item.score:.3f}"
        ax.set_title(head, fontsize=8, fontweight="bold" if i == 0 else "normal")
        if item.labels:
            lines = []
            for k, v in item.labels.items():
                lines.append((f"{k}: {v}", i > 0 and q_labels.get(k) == v))
            for j, (text, same) in enumerate(lines):
                ax.text(0.5, -0.06 - 0.12 * j, text, ha="center", va="top", fontsize=7, transform=ax.transAxes,
                        color="green" if same else "black", fontweight="bold" if same else "normal")
        if item.note:
            ax.text(0.5, -0.06 - 0.12 * len(item.labels or {}), item.note, ha="center", va="top", fontsize=6,
                    transform=ax.transAxes, color="grey")
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
