"""The dual-output image encoder E_img: one ResNet backbone, two outputs.

* input normalisation = a fixed first layer ``(x - mean) / std`` (:class:`Normalize`, from
  ``spec.normalize``; no trainable parameters and nothing in the state dict, so encoders
  exported before it load unchanged with ``normalize: none``).
* e_SEM = mean pooling of the last conv stage (2048-d for ResNet50/101, 512-d for 18/34).
* e_STY = style from channel Gram matrices of early residual blocks. For each chosen
  block output F (C×H·W), G = F Fᵀ / (H·W); the max over one channel axis of G gives a
  C-vector; the vectors of all chosen blocks are stacked and max-pooled again into one
  C-vector (256-d on ResNet50/101 with ``layer1.0..2``; 64-d on ResNet18/34).

The classifier head used by the pretext task (multi-label tags) is optional, so the
exported encoder carries only the backbone.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torchvision
from torch import nn

from umair.image.spec import EncoderSpec


class DualOutput(NamedTuple):
    sem: torch.Tensor  # [B, D_sem]
    sty: torch.Tensor  # [B, C_sty]
    logits: torch.Tensor | None  # [B, n_tags] when the model has a tag head


# How the two outputs are pooled (DualEncoder.forward, gram_style), recorded in encoder
# manifests and hashed into the encoder version (umair.image.checkpoint.encoder_version):
# change it whenever that code changes what it computes.
POOLING = {
    "sem": "mean over H'xW' of layer4",
    "sty": "Gram F.F^T/(H*W) of each style block in float32; max over one channel axis; max over the blocks",
}


class Normalize(nn.Module):
    """The encoder's fixed first layer: [B, 3, H, W] in [0, 1] → (x - mean) / std per
    channel. The statistics are non-persistent buffers (they follow the spec, not the
    state dict); mean 0 and std 1 (``normalize: none``) is the identity."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.identity = tuple(mean) == (0.0, 0.0, 0.0) and tuple(std) == (1.0, 1.0, 1.0)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return x
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


EARLY_BLOCKS = ("stem", "layer1", "layer2", "layer3")


def early_modules(model: DualEncoder, upto: str) -> list[nn.Module]:
    """The backbone's modules from the stem up to and including ``upto`` (one of
    :data:`EARLY_BLOCKS`): what the pretext job may freeze for its first epochs."""
    if upto not in EARLY_BLOCKS:
        raise ValueError(f"cannot freeze up to {upto!r}: expected one of {', '.join(EARLY_BLOCKS)}")
    names = EARLY_BLOCKS[: EARLY_BLOCKS.index(upto) + 1]
    return [getattr(model, n) for n in names]


def gram_style(feature_maps: list[torch.Tensor]) -> torch.Tensor:
    """e_STY from a list of [B, C, H, W] maps (same C): max-reduced Gram matrices, max-pooled.

    Returns [B, C]. Computed in float32 whatever the input dtype (Gram sums overflow fp16).
    """
    vectors = []
    for f in feature_maps:
        b, c, h, w = f.shape
        flat = f.float().reshape(b, c, h * w)
        gram = torch.bmm(flat, flat.transpose(1, 2)) / (h * w)  # [B, C, C]
        vectors.append(gram.amax(dim=2))  # max over one channel axis -> [B, C]
    return torch.stack(vectors, dim=1).amax(dim=1)


class DualEncoder(nn.Module):
    """The dual-output image encoder E_img (paper section 2.2): one torchvision ResNet,
    two image features e_SEM and e_STY (plus the pretext task's tag logits when it has a
    tag head).

    With ``F_last`` [B, C_last, H', W'] the output of the last stage (``layer4``) and
    ``F^b`` [B, C, H, W] the output of each style block ``b`` (``spec.style_layers``;
    default the blocks of ``layer1``: ``layer1.0..2``, only two on ResNet18), read as
    [B, C, H·W]::

        e_SEM   = GAP(F_last) = 1/(H' W') Σ_{h,w} F_last[:, :, h, w]      [B, C_last]
        G^b     = F^b (F^b)ᵀ / (H·W)                                      [B, C, C]
        s^b_c   = max_{c'} G^b_{c c'}      (max over one channel axis)    [B, C]
        e_STY   = max_b s^b                (max over the style blocks)    [B, C]
        logits  = W_tag e_SEM + b_tag      (only when ``n_tags > 0``)     [B, n_tags]

    ``C_last`` (:attr:`sem_dim`) is 2048 on ResNet50/101 and 512 on ResNet18/34; ``C``
    (:attr:`sty_dim`) is 256 and 64 with the default style blocks. The Gram matrices are
    computed in float32 (:func:`gram_style`). Before the stem, the fixed layer
    :attr:`normalize` (:class:`Normalize`) applies ``spec.normalize``.

    Args:
        spec: backbone, image size, style blocks and normalisation (:class:`EncoderSpec`);
            the style blocks must exist and share one channel count, and ``normalize:
            dataset`` needs measured mean/std (ValueError otherwise).
        n_tags: width of the multi-label tag head of the pretext task; 0 = no head (the
            exported encoder carries only the backbone).
        weights: a torchvision weights enum name such as ``"IMAGENET1K_V2"``, or None for
            a randomly initialised backbone.

    Input: ``images`` [B, 3, S, S] floats in [0, 1] (``S = spec.image_size``; any size
    the backbone accepts works). Output: :class:`DualOutput` ``(sem [B, sem_dim],
    sty [B, sty_dim], logits [B, n_tags] or None)``. For inference on uint8 images, on a
    GPU if there is one, use :func:`encode`.

    Example::

        >>> import torch
        >>> from umair.image.encoder import DualEncoder
        >>> from umair.image.spec import EncoderSpec
        >>> model = DualEncoder(EncoderSpec(backbone="resnet18", image_size=32), n_tags=5).eval()
        >>> model.style_layers, model.sem_dim, model.sty_dim
        (('layer1.0', 'layer1.1'), 512, 64)
        >>> with torch.no_grad():
        ...     out = model(torch.rand(2, 3, 32, 32))
        >>> out.sem.shape, out.sty.shape, out.logits.shape
        (torch.Size([2, 512]), torch.Size([2, 64]), torch.Size([2, 5]))
        >>> bool((out.sty >= 0).all())  # each Gram diagonal entry is a mean of squares
        True
    """

    def __init__(self, spec: EncoderSpec, n_tags: int = 0, weights: str | None = None):
        super().__init__()
        self.spec = spec
        self.normalize = Normalize(*spec.normalization_stats())
        builder = getattr(torchvision.models, spec.backbone)
        net = builder(weights=weights)  # weights: a torchvision enum name such as "IMAGENET1K_V2", or None
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.sem_dim = net.fc.in_features
        self.style_layers = spec.resolved_style_layers()
        modules = dict(self.named_modules())
        missing = [n for n in self.style_layers if n not in modules]
        if missing:
            raise ValueError(f"style layers {missing} do not exist in {spec.backbone}")
        channels = {self._out_channels(modules[n]) for n in self.style_layers}
        if len(channels) != 1:
            raise ValueError(f"style layers {self.style_layers} must share one channel count, found {sorted(channels)}")
        self.sty_dim = channels.pop()
        self.head = nn.Linear(self.sem_dim, n_tags) if n_tags else None
        self._captured: list[torch.Tensor] = []
        for name in self.style_layers:
            modules[name].register_forward_hook(lambda _m, _i, out: self._captured.append(out))

    @staticmethod
    def _out_channels(block: nn.Module) -> int:
        last_bn = [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]
        return last_bn[-1].num_features if not hasattr(block, "bn3") else block.bn3.num_features

    def forward(self, images: torch.Tensor) -> DualOutput:
        """images: [B, 3, S, S] floats in [0, 1] (normalised here by :attr:`normalize`)."""
        self._captured = []
        x = self.stem(self.normalize(images))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        sem = x.mean(dim=(2, 3))
        sty = gram_style(self._captured)
        self._captured = []
        logits = self.head(sem) if self.head is not None else None
        return DualOutput(sem, sty, logits)


@torch.inference_mode()
def encode(
    model: DualEncoder, images: torch.Tensor, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference: float32 on CPU; bf16 autocast and channels_last on a GPU.

    images: [B, 3, S, S] uint8 or float in [0, 1]. Returns float32 (e_SEM, e_STY) on CPU.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    x = images.to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    model.eval()
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
    else:
        out = model(x)
    return out.sem.float().cpu(), out.sty.float().cpu()
