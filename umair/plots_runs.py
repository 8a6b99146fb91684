"""Pictures of a run (matplotlib, Agg; no Ray): what each job writes beside its outputs.

- :func:`training_curves`: loss and AUC per epoch from a model's saved history
  (``model.json`` → ``training.history``): training loss vs validation logloss, validation
  AUC (and GAUC), training AUC where a history records it; the selected epoch marked.
- :func:`alpha_by_segment`: mean effective modality weight ``ᾱ_j = Σ_k β_k α_{k,j}`` per
  modality (e_SEM, e_STY, e_TSEM, ...) per user segment, from ``evaluation.json``'s
  ``segments``.
- :func:`topk_strips`: a few users' top-K lists as one strip of images each (images read
  by URI through :mod:`umair.storage`, local or s3://), captioned with rank, id, score and,
  on a sample world, the item's ground-truth style / content.
- :func:`extraction_summary_plot`: an extraction run's rows per outcome and error reason,
  and images/s over its committed chunks where the summary has ``chunk_log``.

Each returns the PNG bytes and writes them (all-or-nothing) when ``out`` is given.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from umair import storage
from umair.plots import _figure, _save, attention_plot


def training_curves(
    history: Sequence[Mapping[str, Any]],
    out: str | None = None,
    settings: storage.StorageSettings | None = None,
    best_epoch: int | None = None,
    title: str = "training",
    dpi: int = 110,
) -> bytes:
    """Two panels over epochs: loss (``train_loss``; ``val_logloss`` when validated) and AUC
    (``val_auc``, ``val_gauc``; ``train_auc`` if recorded). ``best_epoch`` (default: the
    largest ``val_auc``, else none) is drawn as a dashed line: the epoch the saved model holds."""
    if not history:
        raise ValueError("training_curves: empty history (no epoch finished)")
    plt = _figure()
    epochs = np.array([int(h["epoch"]) for h in history])

    def series(key: str) -> np.ndarray | None:
        vals = np.array([float(h[key]) if h.get(key) is not None else np.nan for h in history])
        return vals if np.isfinite(vals).any() else None

    val_auc = series("val_auc")
    if best_epoch is None and val_auc is not None:
        best_epoch = int(epochs[int(np.nanargmax(val_auc))])
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, keys, heading in (
        (ax_loss, (("train_loss", "train loss"), ("val_logloss", "validation logloss")), "loss (BCE) per epoch"),
        (ax_auc, (("train_auc", "train AUC"), ("val_auc", "validation AUC"), ("val_gauc", "validation GAUC")), "AUC"),
    ):
        drawn = 0
        for key, label in keys:
            vals = series(key)
            if vals is not None:
                ax.plot(epochs, vals, marker="o", ms=4, label=label, ls="--" if "gauc" in key else "-")
                drawn += 1
        if not drawn:
            ax.text(0.5, 0.5, "not recorded\n(no validation window)", ha="center", va="center", color="grey")
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            ax.legend(fontsize=8)
            ax.set_xlabel("epoch")
            ax.set_xticks(epochs if len(epochs) <= 20 else np.linspace(epochs[0], epochs[-1], 11).round())
            if best_epoch is not None:
                ax.axvline(best_epoch, color="crimson", ls=":", lw=1.2)
        ax.set_title(heading, fontsize=9)
    if best_epoch is not None:
        ax_auc.text(
            best_epoch,
            0.02,
            f" saved: epoch {best_epoch} ",
            ha="right" if best_epoch > (epochs[0] + epochs[-1]) / 2 else "left",
            color="crimson",
            fontsize=8,
            transform=ax_auc.get_xaxis_transform(),
        )
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out, settings, dpi)


def alpha_by_segment(
    segments: Mapping[str, Mapping[str, Any]],
    out: str | None = None,
    settings: storage.StorageSettings | None = None,
    modalities: Sequence[str] | None = None,
    title: str = "mean modality attention ᾱ per user segment",
    dpi: int = 110,
) -> bytes:
    """Bars of mean ᾱ_j per modality per segment of ``segments`` (``evaluation.json``'s
    ``{segment: {"alpha": {modality: mean}, "users": n, ...}}``); segments without ᾱ
    (a model without UMCM) are left out, and none at all is an error."""
    alpha = {name: dict(s["alpha"]) for name, s in segments.items() if s.get("alpha")}
    if not alpha:
        raise ValueError("alpha_by_segment: no segment has modality weights ᾱ (a model without UMCM?)")
    names = list(modalities) if modalities else list(next(iter(alpha.values())))
    users = {name: int(segments[name]["users"]) for name in alpha if segments[name].get("users") is not None}
    return attention_plot(alpha, names, title, out, users=users, settings=settings, dpi=dpi)


# --------------------------------------------------------------------------- top-K strips


@dataclass(frozen=True)
class StripItem:
    """One recommended illustration: its id, image URI (None: drawn as a placeholder),
    the model's score and ground-truth labels if known."""

    illust_id: int
    image_uri: str | None
    score: float | None = None
    labels: Mapping[str, str] | None = None


@dataclass(frozen=True)
class UserStrip:
    """A user's top-K list, best first; ``note`` (e.g. the user's planted taste) goes in the title."""

    user_id: int
    items: Sequence[StripItem]
    note: str = ""


def load_rgb(
    uri: str | None, settings: storage.StorageSettings | None = None, max_side: int = 160
) -> np.ndarray | None:
    """An image as RGB uint8 [H, W, 3] at most ``max_side`` px, or None when it cannot be read."""
    if not uri:
        return None
    try:
        from PIL import Image

        with Image.open(io.BytesIO(storage.read_bytes(uri, settings))) as img:
            rgb = img.convert("RGB")
            rgb.thumbnail((max_side, max_side))
            return np.asarray(rgb)
    except Exception:  # a missing or broken image is drawn as a placeholder tile
        return None


def topk_strips(
    strips: Sequence[UserStrip],
    out: str | None = None,
    settings: storage.StorageSettings | None = None,
    title: str = "top-K recommendations",
    dpi: int = 100,
) -> bytes:
    """One row per user: its items' images left to right (rank 1 first), each captioned
    ``#rank id`` and its score, and its labels (e.g. style / content) below."""
    if not strips:
        raise ValueError("topk_strips: no user to draw")
    plt = _figure()
    cols = max(1, max(len(s.items) for s in strips))
    rows = len(strips)
    fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols + 0.6, 2.35 * rows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for r, strip in enumerate(strips):
        axes[r, 0].set_title(
            f"user {strip.user_id}" + (f" ({strip.note})" if strip.note else ""),
            loc="left",
            fontsize=9,
            fontweight="bold",
            pad=16,
        )
        for c, item in enumerate(strip.items):
            ax = axes[r, c]
            image = load_rgb(item.image_uri, settings)
            if image is not None:
                ax.imshow(image, interpolation="nearest")
            else:
                ax.text(0.5, 0.5, "image\nunavailable", ha="center", va="center", fontsize=8, color="grey")
            score = "" if item.score is None else f"  {item.score:.3f}"
            ax.text(
                0.5,
                1.02,
                f"#{c + 1} {item.illust_id}{score}",
                ha="center",
                va="bottom",
                fontsize=7,
                transform=ax.transAxes,
            )
            for j, (k, v) in enumerate((item.labels or {}).items()):
                ax.text(0.5, -0.04 - 0.11 * j, f"{k}: {v}", ha="center", va="top", fontsize=6.5, transform=ax.transAxes)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(h_pad=2.5)
    return _save(fig, out, settings, dpi)


def strips_from_topk(
    topk: Any,
    user_ids: Sequence[int],
    image_uris: Mapping[int, str | None],
    k: int = 8,
    item_labels: Mapping[int, Mapping[str, str]] | None = None,
    user_notes: Mapping[int, str] | None = None,
) -> list[UserStrip]:
    """The :class:`UserStrip` of each of ``user_ids`` from a top-K table (``user_id, rank,
    illust_id, score``, a pyarrow Table), its first ``k`` ranks; users without a list are skipped."""
    cols = {c: topk.column(c).to_numpy() for c in ("user_id", "rank", "illust_id", "score")}
    out = []
    for u in user_ids:
        sel = np.flatnonzero(cols["user_id"] == u)
        sel = sel[np.argsort(cols["rank"][sel], kind="stable")][:k]
        if not len(sel):
            continue
        items = [
            StripItem(
                int(cols["illust_id"][i]),
                image_uris.get(int(cols["illust_id"][i])),
                float(cols["score"][i]),
                (item_labels or {}).get(int(cols["illust_id"][i])),
            )
            for i in sel
        ]
        out.append(UserStrip(int(u), items, (user_notes or {}).get(int(u), "")))
    return out


def pick_users(candidates: Sequence[int], segments: Mapping[int, str], n: int) -> list[int]:
    """Up to ``n`` of ``candidates``: the first user of each segment in turn (so a sample
    world shows one style-, one content-, one tag-driven user ...), then the rest in order."""
    chosen: list[int] = []
    by_segment: dict[str, list[int]] = {}
    for u in candidates:
        by_segment.setdefault(segments.get(int(u), ""), []).append(int(u))
    while len(chosen) < n and any(by_segment.values()):
        for seg in sorted(by_segment):
            if by_segment[seg] and len(chosen) < n:
                chosen.append(by_segment[seg].pop(0))
    return chosen


# --------------------------------------------------------------------------- extraction


@dataclass
class _Bars:
    labels: list[str] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    colours: list[str] = field(default_factory=list)

    def add(self, label: str, value: float, colour: str) -> None:
        self.labels.append(label)
        self.values.append(value)
        self.colours.append(colour)


def extraction_summary_plot(
    summary: Mapping[str, Any],
    out: str | None = None,
    settings: storage.StorageSettings | None = None,
    dpi: int = 110,
) -> bytes:
    """Left: rows per outcome (every modality, missing a modality, without image) and error
    rows per ``stage:reason``. Right: images/s over committed chunks when ``summary`` has
    ``chunk_log`` (``[{"chunk", "t_s", "rows_done"}, ...]``: seconds since the pipeline's
    start and rows done at each commit), else the run's mean and steady images/s."""
    plt = _figure()
    bars = _Bars()
    bars.add("rows: every modality", float(summary.get("rows_ok", 0)), "#2ca02c")
    bars.add("rows: missing a modality", float(summary.get("rows_partial", 0)), "#ff7f0e")
    for m, n in (summary.get("rows_by_modality") or {}).items():
        bars.add(f"rows with {m}", float(n), "#1f77b4")
    bars.add("rows without image_uri", float(summary.get("rows_no_image", 0)), "#7f7f7f")
    for reason, n in (summary.get("failed_by_reason") or {}).items():
        bars.add(f"error: {reason}", float(n), "#d62728")
    fig, (ax_rows, ax_rate) = plt.subplots(1, 2, figsize=(11, 0.32 * len(bars.labels) + 2.4))
    y = np.arange(len(bars.labels))
    ax_rows.barh(y, bars.values, color=bars.colours)
    ax_rows.set_yticks(y, bars.labels, fontsize=8)
    ax_rows.invert_yaxis()
    for yi, v in zip(y, bars.values):
        ax_rows.text(v, yi, f" {int(v):,}", va="center", fontsize=7)
    ax_rows.set_xlabel("rows")
    ax_rows.set_title(f"{summary.get('to_process', sum(bars.values[:2])):,} rows processed", fontsize=9)
    log = list(summary.get("chunk_log") or [])
    if len(log) >= 1:
        t = np.array([0.0] + [float(c["t_s"]) for c in log])
        done = np.array([0.0] + [float(c["rows_done"]) for c in log])
        rate = np.diff(done) / np.maximum(np.diff(t), 1e-9)
        ax_rate.plot(t[1:], rate, marker="o", ms=3, color="#1f77b4", label="per chunk")
        ax_rate.plot(t[1:], done[1:] / np.maximum(t[1:], 1e-9), color="#ff7f0e", label="since start")
        ax_rate.set_xlabel("seconds since the pipeline started")
        ax_rate.set_ylabel("images/s")
        ax_rate.set_ylim(bottom=0)
        ax_rate.legend(fontsize=8)
        ax_rate.set_title(f"images/s over {len(log)} committed chunks", fontsize=9)
    else:
        keys = {"images_per_s": "whole pipeline", "steady_images_per_s": "after the first commit"}
        names = [label for k, label in keys.items() if summary.get(k) is not None]
        vals = [float(summary[k]) for k in keys if summary.get(k) is not None]
        ax_rate.bar(names, vals, color=["#1f77b4", "#ff7f0e"][: len(vals)])
        for i, v in enumerate(vals):
            ax_rate.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
        ax_rate.set_ylabel("images/s")
        ax_rate.set_title("images/s (no per-chunk timings in this summary)", fontsize=9)
    fig.suptitle(f"extraction {summary.get('run_id', '')}".strip(), fontsize=10)
    fig.tight_layout()
    return _save(fig, out, settings, dpi)
