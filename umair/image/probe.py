"""A linear probe of an exported image encoder: how much of the tags e_SEM and e_STY carry.

For each output (e_SEM, e_STY, or both concatenated), standardise the training images'
vectors, fit one L2-regularised logistic regression per tag on them (scikit-learn,
one-vs-rest), and score the held-out images: macro mAP over the tags present in the
held-out split, comparable with the pretext head's ``val_mAP`` and the tag-frequency
baseline. The encoder is frozen; only the probe learns.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from umair import storage
from umair.image.encoder import DualEncoder, encode
from umair.image.preprocess import DecodeError, decode_image, to_tensor_batch
from umair.image.pretext import tag_metrics


def embed_images(
    model: DualEncoder, uris: Iterable[str], batch_size: int = 64, settings: storage.StorageSettings | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """e_SEM [n, D_sem] and e_STY [n, C_sty] (float32) of the images at ``uris`` that
    decode, and the boolean mask [len(uris)] of those that did."""
    spec = model.spec
    sem, sty, ok = [], [], []

    def flush(batch: list[np.ndarray]) -> None:
        e_sem, e_sty = encode(model, to_tensor_batch(np.stack(batch)), "cpu")
        sem.append(e_sem.numpy())
        sty.append(e_sty.numpy())

    batch: list[np.ndarray] = []
    for uri in uris:
        try:
            batch.append(decode_image(storage.read_bytes(uri, settings), spec.image_size, resize=spec.resize))
            ok.append(True)
        except (DecodeError, storage.StorageError):
            ok.append(False)
        if len(batch) == batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    if not sem:
        raise ValueError("no image decoded: nothing to probe")
    return np.concatenate(sem), np.concatenate(sty), np.array(ok, bool)


def probe_map(
    train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, c: float = 1.0, seed: int = 0
) -> float:
    """Held-out macro mAP of per-tag logistic regressions fitted on standardised
    ``train_x`` [n, d] with {0, 1} labels ``train_y`` [n, N]. Tags with no positive in the
    training split are scored with their (zero) training rate; tags with none held out
    are left out of the mean, as in the pretext job's own mAP."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    a, b = scaler.transform(train_x), scaler.transform(val_x)
    scores = np.zeros(val_y.shape, np.float64)
    for t in range(train_y.shape[1]):
        y = train_y[:, t]
        if 0 < y.sum() < len(y):
            clf = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(a, y)
            scores[:, t] = clf.predict_proba(b)[:, 1]
        else:
            scores[:, t] = y.mean()
    return tag_metrics(scores, val_y)["mAP"]
