"""Item features for a sample world computed in this process (no Ray, no extraction job).

A stand-in for ``umair extract`` when a benchmark or ``umair ablate`` needs an
item-features table (contract ``item_features``) quickly:

- e_SEM / e_STY: the dual image encoder (:mod:`umair.image.encoder`, ResNet18 on small
  images) run over the world's images, either with random weights seeded by ``seed`` or
  after :func:`pretext_encoder`'s brief pretext training on the world's tags (which gives
  e_SEM content; e_STY's Gram statistics of the early blocks separate painting styles
  even with random weights);
- e_TSEM: :func:`fixture_tsem`, the mean of random but fixed per-tag vectors (seeded by a
  hash of the tag), not a text encoder.

The file metadata carries the keys the extraction job writes (``umair.<m>.dim``,
``umair.encoder.version``, ``umair.encoder.spec``, ``umair.tsem.encoder``), so training
and evaluation treat it like an extraction output's table.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np


def _tag_vector(tag: str, dim: int, seed: int) -> np.ndarray:
    h = int.from_bytes(hashlib.blake2b(f"{seed}:{tag}".encode(), digest_size=8).digest(), "little")
    return np.random.default_rng(h).standard_normal(dim).astype(np.float32) / np.sqrt(dim)


def fixture_tsem(tags: list[list[str]], dim: int, seed: int = 0) -> np.ndarray:
    """e_TSEM stand-in: mean of random but fixed per-tag vectors (zeros without tags)."""
    cache: dict[str, np.ndarray] = {}
    out = np.zeros((len(tags), dim), np.float32)
    for i, ts in enumerate(tags):
        if ts:
            out[i] = np.mean([cache.setdefault(t, _tag_vector(t, dim, seed)) for t in ts], axis=0)
    return out


def _decode_all(world: Any, size: int) -> np.ndarray:
    from umair import storage
    from umair.image.preprocess import decode_image

    uris = world.illustrations.column("image_uri").to_pylist()
    return np.stack([decode_image(storage.read_bytes(u), size) for u in uris])


def pretext_encoder(
    world: Any,
    image_size: int = 32,
    epochs: int = 3,
    seed: int = 0,
    lr: float = 2e-3,
    batch_size: int = 32,
    backbone: str = "resnet18",
) -> Any:
    """A DualEncoder briefly trained on the pretext task (the world's tags,
    multi-label BCE, horizontal flips), in this process; the tag head is kept."""
    import torch

    from umair.image.encoder import DualEncoder
    from umair.image.preprocess import to_tensor_batch
    from umair.image.spec import EncoderSpec
    from umair.image.tags import multi_hot, tag_vocabulary

    torch.manual_seed(seed)
    tags = world.illustrations.column("tags").to_pylist()
    vocab = tag_vocabulary(tags, 100)
    labels = torch.from_numpy(multi_hot(tags, vocab))
    images = to_tensor_batch(_decode_all(world, image_size))
    model = DualEncoder(EncoderSpec(backbone=backbone, image_size=image_size), n_tags=len(vocab))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(images), generator=gen).split(batch_size):
            x = images[idx]
            x = torch.where(torch.rand(len(x), 1, 1, 1, generator=gen) < 0.5, x.flip(-1), x)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).logits, labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def fixture_item_features(
    world: Any,
    out: str,
    encoder: Any = None,
    image_size: int = 32,
    tsem_dim: int = 32,
    seed: int = 0,
    encoder_version: str | None = None,
) -> str:
    """Item-features table (contract ``item_features``) for a world, written to
    ``out``: e_SEM / e_STY by ``umair.image.encoder.encode`` with ``encoder`` (default: a
    random-weight ResNet18 seeded by ``seed``), e_TSEM by :func:`fixture_tsem`. The file
    metadata carries the keys the extraction job writes (``umair.<m>.dim``,
    ``umair.encoder.version``, ``umair.encoder.spec``, ``umair.tsem.encoder``)."""
    import pyarrow as pa
    import torch

    from umair import storage
    from umair.image.encoder import DualEncoder, encode
    from umair.image.preprocess import to_tensor_batch
    from umair.image.spec import EncoderSpec

    if encoder is None:
        torch.manual_seed(seed)
        encoder = DualEncoder(EncoderSpec(backbone="resnet18", image_size=image_size))
        encoder_version = encoder_version or f"fixture-resnet18-{image_size}px-random-seed{seed}"
    size = encoder.spec.image_size
    images = _decode_all(world, size)
    sems, stys = [], []
    for s in range(0, len(images), 64):
        sem, sty = encode(encoder, to_tensor_batch(images[s : s + 64]), "cpu")
        sems.append(sem.numpy())
        stys.append(sty.numpy())
    sem, sty = np.concatenate(sems), np.concatenate(stys)
    tsem = fixture_tsem(world.illustrations.column("tags").to_pylist(), tsem_dim, seed)
    version = encoder_version or f"fixture-{encoder.spec.backbone}-{size}px"

    def vectors(x: np.ndarray) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float32).ravel()), x.shape[1])

    table = pa.table(
        {
            "illust_id": world.illustrations.column("illust_id"),
            "sem": vectors(sem),
            "sty": vectors(sty),
            "tsem": vectors(tsem),
        }
    )
    meta = {
        "umair.sem.dim": str(sem.shape[1]),
        "umair.sty.dim": str(sty.shape[1]),
        "umair.tsem.dim": str(tsem_dim),
        "umair.encoder.version": version,
        "umair.encoder.spec": encoder.spec.model_dump_json(),
        "umair.tsem.encoder": f"fixture-hashed-tags-{tsem_dim}d-seed{seed}",
    }
    storage.write_parquet(table.replace_schema_metadata(meta), out)
    return out
