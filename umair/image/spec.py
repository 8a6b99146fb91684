"""What defines the dual image encoder's outputs (:class:`EncoderSpec`), without PyTorch:
job settings and the CLI import this, :mod:`umair.image.encoder` builds the network."""

from __future__ import annotations

from typing import Literal

from umair.config import Settings

Backbone = Literal["resnet18", "resnet34", "resnet50", "resnet101"]
LAYER1_BLOCKS = {"resnet18": 2, "resnet34": 3, "resnet50": 3, "resnet101": 3}

# Fields of EncoderSpec that do not change an encoder's outputs (none today). Every other
# field goes into the encoder version (umair.image.checkpoint.encoder_version), so a field
# added later is versioned unless it is listed here.
NOT_OUTPUT_FIELDS: frozenset[str] = frozenset()


class EncoderSpec(Settings):
    """What defines an encoder's outputs; stored with every checkpoint.

    style_layers: names of residual blocks (``layer1.0`` ...) whose Gram matrices make
        e_STY; they must have the same channel count. Default: the first three blocks of
        layer1 (two on ResNet18, which has only two there).
    image_size: images are resized to image_size × image_size and scaled to [0, 1]
        (the authors use 512).

    Every field that changes outputs (:meth:`output_identity`) is hashed into the
    encoder version, with the weights, preprocessing and style pooling.
    """

    backbone: Backbone = "resnet101"
    image_size: int = 512
    style_layers: tuple[str, ...] | None = None

    def resolved_style_layers(self) -> tuple[str, ...]:
        if self.style_layers:
            return tuple(self.style_layers)
        return tuple(f"layer1.{i}" for i in range(LAYER1_BLOCKS[self.backbone]))

    def output_identity(self) -> dict:
        """The fields that change the encoder's outputs (all but :data:`NOT_OUTPUT_FIELDS`),
        as JSON values, normalised so that equal outputs give equal values: the style
        layers resolved (``None`` and the explicit default are one encoder), sorted and
        deduplicated (e_STY max-pools over the blocks, so their order does not matter)."""
        values = self.model_dump(mode="json", exclude=set(NOT_OUTPUT_FIELDS))
        if "style_layers" in values:
            values["style_layers"] = sorted(set(self.resolved_style_layers()))
        return values
