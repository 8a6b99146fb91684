"""The image pretext recipe: colour-preserving augmentation, the asymmetric loss, the
cosine schedule, and the linear probe that scores an exported encoder (issue #22)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from umair.config import ConfigError, parse_settings
from umair.image.pretext import (
    AugmentSettings,
    LossSettings,
    ScheduleSettings,
    asymmetric_loss,
    augment,
    lr_factor,
)
from umair.image.probe import probe_map


def test_asl_without_focusing_or_shift_is_binary_cross_entropy():
    torch.manual_seed(0)
    logits, targets = torch.randn(16, 23) * 3, (torch.rand(16, 23) < 0.1).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    plain = asymmetric_loss(logits, targets, LossSettings(gamma_neg=0, gamma_pos=0, clip=0))
    assert float(plain) == pytest.approx(float(bce), rel=1e-5)
    assert float(asymmetric_loss(logits, targets, LossSettings(kind="bce"))) == pytest.approx(float(bce), rel=1e-6)


def test_asl_ignores_easy_negatives_and_keeps_the_positives_gradient():
    settings = LossSettings()  # γ− 4, γ+ 0, m 0.05
    easy = torch.tensor([[math.log(0.04 / 0.96)]], requires_grad=True)  # p = 0.04 < m: no loss, no gradient
    loss = asymmetric_loss(easy, torch.zeros(1, 1), settings)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-7) and float(easy.grad) == pytest.approx(0.0, abs=1e-7)
    hard = torch.tensor([[2.0]])  # a confident wrong negative still costs
    assert float(asymmetric_loss(hard, torch.zeros(1, 1), settings)) > 0.5
    pos = torch.tensor([[0.3]], requires_grad=True)
    asymmetric_loss(pos, torch.ones(1, 1), settings).backward()
    ref = torch.tensor([[0.3]], requires_grad=True)
    torch.nn.functional.binary_cross_entropy_with_logits(ref, torch.ones(1, 1)).backward()
    assert float(pos.grad) == pytest.approx(float(ref.grad), rel=1e-5)


def test_the_cosine_schedule_warms_up_peaks_and_ends_at_its_floor():
    s = ScheduleSettings(warmup_epochs=1.0, min_factor=0.01)
    steps, epochs = 10, 5
    f = [lr_factor(i, steps, epochs, s) for i in range(steps * epochs)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:9], f[1:10])), "linear warm-up"
    after = f[10:]
    assert all(a >= b for a, b in zip(after, after[1:])), "then only down"
    assert after[0] == pytest.approx(1.0) and f[-1] == pytest.approx(0.01)
    assert lr_factor(17, steps, epochs, ScheduleSettings(kind="constant")) == 1.0


def test_augmentation_moves_pixels_but_never_changes_a_colour():
    torch.manual_seed(0)
    solid = torch.zeros(8, 3, 32, 32)
    solid[:, 0], solid[:, 2] = 0.8, 0.3  # one colour (a hair colour, say)
    out = augment(solid, AugmentSettings())
    assert out.shape == solid.shape
    assert torch.allclose(out, solid, atol=1e-5), "a one-colour image stays that colour"
    halves = torch.zeros(8, 3, 32, 32)
    halves[:, 0, :, :16] = 1.0  # red left, blue right
    halves[:, 2, :, 16:] = 1.0
    out = augment(halves, AugmentSettings(crop_scale=(0.3, 0.6)))
    assert not torch.allclose(out, halves), "crops and flips changed the layout"
    assert torch.allclose(out[:, 0] + out[:, 2], torch.ones_like(out[:, 0]), atol=1e-3), (
        "every pixel is a blend of the two colours (resampling), never a new hue"
    )
    assert float(out[:, 1].abs().max()) < 1e-5
    same = augment(halves, AugmentSettings(flip=False, crop_scale=(1.0, 1.0)))
    assert torch.equal(same, halves)


def test_bad_crop_settings_name_the_key():
    with pytest.raises(ConfigError, match="crop_scale"):
        parse_settings({"crop_scale": [0.0, 1.0]}, AugmentSettings, "pretrain.yaml")
    with pytest.raises(ConfigError, match="gamma_neg"):
        parse_settings({"gamma_neg": -1}, LossSettings, "pretrain.yaml")


def test_the_linear_probe_finds_tags_that_are_linear_in_the_features_and_not_others():
    rng = np.random.default_rng(0)
    n, tags, d = 600, 5, 16
    y = (rng.random((n, tags)) < 0.2).astype(int)
    x = rng.normal(size=(n, d))
    x[:, :tags] += 2.5 * y  # tag t shifts feature t
    train, val = slice(0, 400), slice(400, n)
    informative = probe_map(x[train], y[train], x[val], y[val])
    noise = probe_map(rng.normal(size=(400, d)), y[train], rng.normal(size=(200, d)), y[val])
    assert informative > 0.85 and noise < 0.4, (informative, noise)


def test_dataset_statistics_are_measured_on_the_images_that_decode(tmp_path):
    from PIL import Image

    from umair.image.spec import EncoderSpec, with_dataset_statistics

    uris = []
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255)]):  # one red, one blue image
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (20, 20), colour).save(path)
        uris.append(str(path))
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    uris.append(str(tmp_path / "broken.jpg"))  # skipped, not fatal
    spec = EncoderSpec(backbone="resnet18", image_size=16, resize="squash", normalize="dataset")
    measured = with_dataset_statistics(spec, uris, "catalogue.parquet")
    assert measured.mean == pytest.approx((0.5, 0.0, 0.5), abs=1e-6)
    assert measured.std == pytest.approx((0.5, 1e-6, 0.5), abs=1e-5)
    imagenet = EncoderSpec(backbone="resnet18", image_size=16)
    assert with_dataset_statistics(imagenet, uris, "catalogue.parquet") is imagenet
    with pytest.raises(ValueError, match=r"catalogue\.parquet: no training image decodes"):
        with_dataset_statistics(spec, uris[-1:], "catalogue.parquet")


def test_embed_images_returns_both_outputs_for_the_images_that_decode(tmp_path):
    from PIL import Image

    from umair.image.encoder import DualEncoder
    from umair.image.probe import embed_images
    from umair.image.spec import EncoderSpec

    uris = []
    for i in range(3):
        Image.new("RGB", (20, 20), (40 * i, 10, 200)).save(tmp_path / f"{i}.png")
        uris.append(str(tmp_path / f"{i}.png"))
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    uris.insert(1, str(tmp_path / "bad.jpg"))
    model = DualEncoder(EncoderSpec(backbone="resnet18", image_size=32))
    sem, sty, ok = embed_images(model, uris, batch_size=2)
    assert ok.tolist() == [True, False, True, True]
    assert sem.shape == (3, model.sem_dim) and sty.shape == (3, model.sty_dim)
    assert np.isfinite(sem).all() and not np.allclose(sem[0], sem[2])
