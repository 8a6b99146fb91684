"""What defines the dual image encoder's outputs (:class:`EncoderSpec`), without PyTorch:
job settings and the CLI import this, :mod:`umair.image.encoder` builds the network."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import model_validator

from umair.config import Settings

Backbone = Literal["resnet18", "resnet34", "resnet50", "resnet101"]
ResizeMode = Literal["squash", "pad", "center_crop"]
Normalization = Literal["none", "imagenet", "dataset"]
LAYER1_BLOCKS = {"resnet18": 2, "resnet34": 3, "resnet50": 3, "resnet101": 3}

# torchvision's ImageNet statistics (inputs in [0, 1]); what IMAGENET1K_* weights were trained on.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Fields of EncoderSpec that do not change an encoder's outputs (none today). Every other
# field goes into the encoder version (umair.image.checkpoint.encoder_version), so a field
# added later is versioned unless it is listed here.
NOT_OUTPUT_FIELDS: frozenset[str] = frozenset()

# What a manifest written before a field existed meant by its absence: encoders exported
# before resize modes and normalisation squashed every image to a square and fed [0, 1]
# pixels unnormalised. :meth:`EncoderSpec.from_manifest` fills these in, so such an encoder
# keeps its stored behaviour (new encoders get the field defaults: ``pad``, ``imagenet``).
LEGACY_DEFAULTS: dict[str, object] = {"resize": "squash", "normalize": "none"}


class EncoderSpec(Settings):
    """What defines an encoder's outputs; stored with every checkpoint.

    style_layers: names of residual blocks (``layer1.0`` ...) whose Gram matrices make
        e_STY; they must have the same channel count. Default: the first three blocks of
        layer1 (two on ResNet18, which has only two there).
    image_size: images are fitted to image_size × image_size (the authors use 512).
    resize: how an image of another shape becomes S × S (:func:`umair.image.preprocess.fit_geometry`):
        ``squash`` (stretch, aspect ratio lost), ``pad`` (scale the longer side to S, keep the
        aspect ratio, pad with neutral grey; default for new encoders) or ``center_crop`` (scale
        the shorter side to S, crop the centre).
    normalize: the encoder's fixed first layer ``(x - mean) / std`` on inputs in [0, 1]:
        ``imagenet`` (torchvision's statistics; for ImageNet-trained weights; default),
        ``dataset`` (``mean`` / ``std`` measured on the pretext set, filled in by
        ``umair pretrain-image``) or ``none`` (raw [0, 1], the authors' setting).
    mean, std: per-channel (R, G, B) statistics; only with ``normalize: dataset``.

    Every field that changes outputs (:meth:`output_identity`) is hashed into the
    encoder version, with the weights, preprocessing and style pooling.
    """

    backbone: Backbone = "resnet101"
    image_size: int = 512
    style_layers: tuple[str, ...] | None = None
    resize: ResizeMode = "pad"
    normalize: Normalization = "imagenet"
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    @model_validator(mode="after")
    def _stats_match_the_mode(self) -> EncoderSpec:
        if self.normalize != "dataset" and (self.mean is not None or self.std is not None):
            raise ValueError(f"mean/std are set only with normalize: dataset (normalize is {self.normalize})")
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std go together: set both or neither")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {list(self.std)}")
        return self

    @classmethod
    def from_manifest(cls, spec: dict) -> EncoderSpec:
        """The spec recorded in a manifest; fields it lacks (written before they existed)
        take their :data:`LEGACY_DEFAULTS`, not today's defaults."""
        return cls(**{**LEGACY_DEFAULTS, **spec})

    def resolved_style_layers(self) -> tuple[str, ...]:
        if self.style_layers:
            return tuple(self.style_layers)
        return tuple(f"layer1.{i}" for i in range(LAYER1_BLOCKS[self.backbone]))

    def normalization_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std), 3 floats each, of the first layer; ``none`` is (0, 0, 0), (1, 1, 1).
        ValueError for ``dataset`` without measured statistics (the pretext job measures them)."""
        if self.normalize == "imagenet":
            return IMAGENET_MEAN, IMAGENET_STD
        if self.normalize == "none":
            return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        if self.mean is None or self.std is None:
            raise ValueError(
                "normalize: dataset needs mean and std; `umair pretrain-image` measures them on the pretext set"
            )
        return tuple(self.mean), tuple(self.std)

    def output_identity(self) -> dict:
        """The fields that change the encoder's outputs (all but :data:`NOT_OUTPUT_FIELDS`),
        as JSON values, normalised so that equal outputs give equal values: the style
        layers resolved (``None`` and the explicit default are one encoder), sorted and
        deduplicated (e_STY max-pools over the blocks, so their order does not matter); the
        normalisation as its resolved statistics (``none`` equals ``dataset`` with mean 0,
        std 1). A ``dataset`` spec whose statistics are not measured yet keeps the mode."""
        values = self.model_dump(mode="json", exclude=set(NOT_OUTPUT_FIELDS))
        if "style_layers" in values:
            values["style_layers"] = sorted(set(self.resolved_style_layers()))
        if "normalize" in values:
            values.pop("mean", None), values.pop("std", None)
            if self.normalize != "dataset" or self.mean is not None:
                mean, std = self.normalization_stats()
                values["normalize"] = {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
        return values


def read_exported_spec(source: str, settings=None) -> EncoderSpec:
    """The spec of an exported encoder directory (local or s3://) from its ``manifest.json``
    (:meth:`EncoderSpec.from_manifest`), without loading weights or PyTorch."""
    from umair import storage

    return EncoderSpec.from_manifest(
        json.loads(storage.read_bytes(storage.join(source, "manifest.json"), settings))["spec"]
    )


def with_dataset_statistics(spec: EncoderSpec, uris: list[str], source: str, settings=None) -> EncoderSpec:
    """``spec`` with ``normalize: dataset`` statistics measured per channel (inputs in [0, 1],
    after the spec's resize) on the images at ``uris`` that decode; other specs, and specs
    with their statistics given, are returned as they are. ``source`` names the images in
    the error raised when none decodes."""
    if spec.normalize != "dataset" or spec.mean is not None:
        return spec
    import numpy as np

    from umair import storage
    from umair.image.preprocess import DecodeError, decode_image

    total, squares, pixels = np.zeros(3), np.zeros(3), 0
    for uri in uris:
        try:
            img = decode_image(storage.read_bytes(uri, settings), spec.image_size, resize=spec.resize) / 255.0
        except (DecodeError, storage.StorageError):
            continue
        total += img.reshape(-1, 3).sum(0)
        squares += (img.reshape(-1, 3) ** 2).sum(0)
        pixels += img.shape[0] * img.shape[1]
    if not pixels:
        raise ValueError(f"{source}: no training image decodes; cannot measure normalize: dataset statistics")
    mean = total / pixels
    std = np.sqrt(np.maximum(squares / pixels - mean**2, 1e-12))
    stats = {"mean": tuple(round(float(v), 6) for v in mean), "std": tuple(round(float(v), 6) for v in std)}
    return EncoderSpec(**{**spec.model_dump(), **stats})
