"""The vector modalities of an item, defined once.

A modality is a fixed-width vector per item produced by an encoder: the paper's e_SEM
(image semantics), e_STY (painting style) and e_TSEM (tag-text semantics). Its ``name``
is the item-features column (``fixed_size_list<float>``), the key of the model's
``vectors`` setting and of the ``vectors`` mapping :class:`~umair.model.fusion.UmairFPS`
reads, and the ``umair.<name>.dim`` metadata key of the features file. Registration order
is the order in which UMCM stacks the modalities (the metadata modality ``meta`` comes
last, see :mod:`umair.model.settings`).

Adding a modality (e.g. a CLIP image vector) = its encoder writing the column, plus one
:func:`register` call; the model settings, feature space, feature store, training,
evaluation and the baselines read this registry.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Modality:
    """One vector modality.

    Args:
        name: column / key, lower-case identifier (``sty``).
        symbol: the paper's symbol (``e_STY``), for docs and plots.
        encoder: which encoder writes it; each encoder's version is recorded once per
            feature set (``image`` for e_SEM and e_STY, ``text`` for e_TSEM).
        default_dim: width of the production encoder's vector (the model setting's default).
        description: one line for people.
    """

    name: str
    symbol: str
    encoder: str
    default_dim: int
    description: str

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or self.name != self.name.lower() or self.name == "meta":
            raise ValueError(f"modality name {self.name!r}: expected a lower-case identifier other than 'meta'")
        if self.default_dim < 1:
            raise ValueError(f"modality {self.name!r}: default_dim must be >= 1, got {self.default_dim}")


_REGISTRY: dict[str, Modality] = {}


def register(modality: Modality) -> Modality:
    """Add ``modality`` (stacked after those registered before it); refuses a second one of the same name."""
    if modality.name in _REGISTRY:
        raise ValueError(f"modality {modality.name!r} is already registered")
    _REGISTRY[modality.name] = modality
    return modality


def unregister(name: str) -> None:
    """Remove a registered modality (tests that add a toy one clean up with this)."""
    _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    """Every registered modality name, in stacking order."""
    return tuple(_REGISTRY)


def get(name: str) -> Modality:
    """The registered modality ``name``; ``KeyError`` naming the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown modality {name!r}; registered: {list(_REGISTRY)}") from None


def default_dims() -> dict[str, int]:
    """name -> default width of every registered modality (the model's default ``vectors``)."""
    return {m.name: m.default_dim for m in _REGISTRY.values()}


def of_encoder(encoder: str) -> tuple[str, ...]:
    """The modalities one encoder writes (``image`` -> ``("sem", "sty")``)."""
    return tuple(m.name for m in _REGISTRY.values() if m.encoder == encoder)


register(
    Modality(
        "tsem",
        "e_TSEM",
        "text",
        384,
        "tag-text semantics: the text encoder over the item's tags (all-MiniLM-L6-v2: 384)",
    )
)
register(
    Modality(
        "sem",
        "e_SEM",
        "image",
        2048,
        "image semantics: global average pool of the backbone's last stage (ResNet101: 2048)",
    )
)
register(
    Modality(
        "sty", "e_STY", "image", 256, "painting style: max-reduced Gram matrices of the layer1 blocks (256 channels)"
    )
)
