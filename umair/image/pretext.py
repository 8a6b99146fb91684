"""The pretext recipe of the dual image encoder: augmentation, loss and learning-rate schedule.

The pretext task predicts an illustration's tags from its pixels (multi-label, N tags).
Three parts of its recipe live here, importable without Ray:

* :func:`augment`: horizontal flips and, when asked, random resized crops at a mild
  scale, per image. Colour is never touched (no hue, saturation or brightness jitter):
  colour *is* a tag here (hair colour, eye colour, a palette), and e_STY is built from
  colour statistics. Crops are off by default: on the sample world they moved e_SEM from
  content towards style (with 60-100 % crops tests/test_pretrain_image.py's e_SEM
  assertion fails; bench/RESULTS.md "Image pretext task"): a cut subject leaves the
  palette as the cue.
* :func:`asymmetric_loss`: ASL (Ben-Baruch et al., 2021) for sparse multi-label targets,
  where an image has 2 of 23 tags and the negatives' easy gradients swamp the positives':

      p = σ(z);  p_m = max(p − m, 0)            (probability shifting of negatives)
      L+ = (1 − p)^γ+ · log(p)                   for y = 1
      L− = p_m^γ− · log(1 − p_m)                 for y = 0
      L = −mean over [B, N] of (y · L+ + (1 − y) · L−)

  With γ+ = γ− = 0 and m = 0 it is binary cross-entropy (``kind: bce``).
* :func:`lr_factor`: linear warm-up over ``warmup_epochs``, then a cosine from the base
  rate down to ``min_factor`` × base at the last step (``kind: constant`` keeps it flat).
  A function of the global step alone, so a resumed run needs no scheduler state.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field, model_validator

from umair.config import Settings

if TYPE_CHECKING:  # torch is imported where it is used: the settings load without it (`umair JOB --help`)
    import torch


class AugmentSettings(Settings):
    """Colour-preserving augmentation of the pretext's training images."""

    flip: bool = True  # horizontal flips (p = 0.5)
    crop_scale: tuple[float, float] = (1.0, 1.0)  # area fraction of random resized crops; (1, 1) = no crops
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratios of the crops

    @model_validator(mode="after")
    def _ranges(self) -> AugmentSettings:
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must be 0 < low <= high <= 1, got {self.crop_scale}")
        if not 0.0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio must be 0 < low <= high, got {self.crop_ratio}")
        return self


class LossSettings(Settings):
    """The multi-label loss: ``asl`` (asymmetric) or ``bce``."""

    kind: Literal["asl", "bce"] = "asl"
    gamma_neg: float = Field(4.0, ge=0.0)  # γ−: focusing of negatives
    gamma_pos: float = Field(0.0, ge=0.0)  # γ+: focusing of positives
    clip: float = Field(0.05, ge=0.0, lt=1.0)  # m: probability shift of negatives


class ScheduleSettings(Settings):
    """The learning rate over the run: ``cosine`` (with warm-up) or ``constant``."""

    kind: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = Field(1.0, ge=0.0)
    min_factor: float = Field(0.01, ge=0.0, le=1.0)  # the last step's rate, as a fraction of lr


def augment(images: torch.Tensor, settings: AugmentSettings) -> torch.Tensor:
    """[B, 3, H, W] float images → the same shape, each cropped to a random box of
    ``crop_scale`` × its area and ``crop_ratio`` aspect, resized back to H×W (bilinear,
    antialiased), and flipped with p 0.5. Pixels are moved and interpolated, never
    recoloured. Draws from torch's global generator (the job seeds it)."""
    import torch
    from torchvision.transforms.v2 import RandomResizedCrop
    from torchvision.transforms.v2 import functional as tvf

    b, _, h, w = images.shape
    out = images
    if settings.crop_scale != (1.0, 1.0):
        scale, ratio = list(settings.crop_scale), list(settings.crop_ratio)
        boxes = [RandomResizedCrop.get_params(images[i], scale, ratio) for i in range(b)]
        out = torch.stack([tvf.resized_crop(images[i], *box, [h, w], antialias=True) for i, box in enumerate(boxes)])
    if settings.flip:
        flip = torch.rand(b, device=out.device) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return out


def asymmetric_loss(logits: torch.Tensor, targets: torch.Tensor, settings: LossSettings) -> torch.Tensor:
    """The mean multi-label loss over [B, N] logits and {0, 1} targets (module docstring)."""
    import torch

    f = torch.nn.functional
    if settings.kind == "bce":
        return f.binary_cross_entropy_with_logits(logits, targets)
    pos = targets * f.logsigmoid(logits)  # log p
    if settings.clip > 0:
        p_neg = (torch.sigmoid(logits) - settings.clip).clamp(min=0.0)
        neg = (1 - targets) * torch.log1p(-p_neg.clamp(max=1 - 1e-6))  # log(1 − p_m)
    else:
        p_neg = torch.sigmoid(logits)
        neg = (1 - targets) * f.logsigmoid(-logits)  # log(1 − p)
    if settings.gamma_pos > 0:
        pos = pos * (1 - torch.sigmoid(logits)).pow(settings.gamma_pos)
    if settings.gamma_neg > 0:
        neg = neg * p_neg.pow(settings.gamma_neg)
    return -(pos + neg).mean()


def lr_factor(step: int, steps_per_epoch: int, epochs: int, settings: ScheduleSettings) -> float:
    """The learning rate at global step ``step`` (0-based) as a fraction of the base rate."""
    if settings.kind == "constant":
        return 1.0
    total = max(1, steps_per_epoch * epochs)
    warmup = int(round(settings.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    return settings.min_factor + (1 - settings.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def tag_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Macro mAP over the tags with a positive in ``labels`` [n, N] and micro-F1 at 0.5 of
    ``scores`` [n, N] (probabilities): the pretext job's validation metrics."""
    from sklearn.metrics import average_precision_score, f1_score

    present = labels.sum(0) > 0
    if not present.any():
        return {"mAP": float("nan"), "micro_f1": float("nan")}
    m_ap = float(average_precision_score(labels[:, present], scores[:, present], average="macro"))
    micro_f1 = float(f1_score(labels, (scores > 0.5).astype(int), average="micro", zero_division=0))
    return {"mAP": m_ap, "micro_f1": micro_f1}


def frequency_baseline(labels: np.ndarray, is_val: np.ndarray) -> dict[str, float]:
    """:func:`tag_metrics` of scoring every validation image with the training tag rates."""
    prior = labels[~is_val].mean(0)
    return tag_metrics(np.tile(prior, (int(is_val.sum()), 1)), labels[is_val])
