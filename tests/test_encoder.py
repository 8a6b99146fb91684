"""The dual-output image encoder: formulas against NumPy, checkpoints, clear errors."""

from __future__ import annotations

import doctest
import json
import os

import numpy as np
import pytest
import torch

from umair.image.checkpoint import CheckpointError, load_encoder, save_encoder
from umair.image.encoder import DualEncoder, encode, gram_style
from umair.image.spec import EncoderSpec


def _numpy_style(maps: list[np.ndarray]) -> np.ndarray:
    out = []
    for f in maps:  # f: [B, C, H, W]
        b, c, h, w = f.shape
        flat = f.reshape(b, c, h * w).astype(np.float64)
        gram = np.einsum("bik,bjk->bij", flat, flat) / (h * w)
        out.append(gram.max(axis=2))
    return np.stack(out, axis=1).max(axis=1)


def test_gram_style_matches_numpy():
    rng = np.random.default_rng(0)
    maps = [rng.normal(size=(2, 5, 3, 4)).astype(np.float32) for _ in range(3)]
    got = gram_style([torch.from_numpy(m) for m in maps]).numpy()
    np.testing.assert_allclose(got, _numpy_style(maps), rtol=1e-5, atol=1e-6)  # float32 vs float64


def test_encoder_outputs_match_direct_computation():
    torch.manual_seed(0)
    model = DualEncoder(EncoderSpec(backbone="resnet18", image_size=32)).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        h = model.stem(model.normalize(x))  # the fixed first layer: ImageNet mean/std by default
        block_outputs = []
        for block in model.layer1:
            h = block(h)
            block_outputs.append(h.numpy())
        last = model.layer4(model.layer3(model.layer2(h))).numpy()
    assert out.sem.shape == (3, 512) and out.sty.shape == (3, 64) and out.logits is None
    np.testing.assert_allclose(out.sem.numpy(), last.mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.sty.numpy(), _numpy_style(block_outputs), rtol=1e-4, atol=1e-5)


def test_style_layers_are_a_setting_and_checked():
    m = DualEncoder(EncoderSpec(backbone="resnet50", image_size=32))
    assert m.style_layers == ("layer1.0", "layer1.1", "layer1.2") and (m.sem_dim, m.sty_dim) == (2048, 256)
    m = DualEncoder(EncoderSpec(backbone="resnet18", image_size=32, style_layers=("layer2.0", "layer2.1")))
    assert m.sty_dim == 128
    with pytest.raises(ValueError, match=r"must share one channel count, found \[64, 128\]"):
        DualEncoder(EncoderSpec(backbone="resnet18", style_layers=("layer1.0", "layer2.0")))
    with pytest.raises(ValueError, match=r"style layers \['layer9.0'\] do not exist in resnet18"):
        DualEncoder(EncoderSpec(backbone="resnet18", style_layers=("layer9.0",)))


def test_encode_accepts_uint8_and_returns_float32():
    model = DualEncoder(EncoderSpec(backbone="resnet18", image_size=32))
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    sem, sty = encode(model, images, device="cpu")
    assert sem.dtype == sty.dtype == torch.float32 and sem.shape == (2, 512) and sty.shape == (2, 64)
    sem2, _ = encode(model, images.float() / 255, device="cpu")
    torch.testing.assert_close(sem, sem2)


def test_checkpoint_roundtrip_drops_the_head_and_reproduces_outputs(tmp_path):
    torch.manual_seed(1)
    model = DualEncoder(EncoderSpec(backbone="resnet18", image_size=32), n_tags=7).eval()
    manifest = save_encoder(model, str(tmp_path / "enc"), tag_vocab_hash="abc", training_data_version="v1")
    assert manifest["sem_dim"] == 512 and manifest["sty_dim"] == 64 and manifest["tag_vocab_hash"] == "abc"
    assert manifest["preprocessing"]["resize"] == [32, 32] and manifest["version"].startswith("resnet18-32px-")
    loaded, meta = load_encoder(str(tmp_path / "enc"))
    assert loaded.head is None and meta["version"] == manifest["version"]
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(encode(loaded, x, "cpu"), encode(model, x, "cpu"))


def test_corrupt_and_mismatched_checkpoints_fail_clearly(tmp_path):
    model = DualEncoder(EncoderSpec(backbone="resnet18", image_size=32))
    out = tmp_path / "enc"
    save_encoder(model, str(out))
    weights = out / "encoder.pt"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 3])
    with pytest.raises(CheckpointError, match=rf"{weights}: corrupt checkpoint, cannot be loaded"):
        load_encoder(str(out))
    weights.write_bytes(good)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["spec"]["backbone"] = "resnet34"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        CheckpointError, match=rf"{weights}: weights do not match the manifest's backbone resnet34 \(missing \d+ keys"
    ):
        load_encoder(str(out))
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable encoder manifest"):
        load_encoder(str(out))
    os.remove(out / "manifest.json")
    with pytest.raises(CheckpointError, match="manifest.json: not a readable encoder manifest"):
        load_encoder(str(out))


def test_the_dual_encoder_docstring_example_runs():
    """The ``>>>`` example of :class:`DualEncoder`, run with empty globals (it imports
    what it uses), so it cannot rot."""
    assert "G^b     = F^b (F^b)ᵀ / (H·W)" in (DualEncoder.__doc__ or "")
    tests = doctest.DocTestFinder(recurse=False).find(DualEncoder, globs={})
    assert sum(len(test.examples) for test in tests) >= 3
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
