"""The production image path on CPU: resize modes (pad keeps the aspect ratio), the
normalisation layer, pretrained starts, and the GPU JPEG decode path's planning and
fallbacks with the CUDA decoder replaced by torchvision's CPU decoder (same interface)."""

from __future__ import annotations

import io
import json
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from umair.config import StorageConfig
from umair.extraction.settings import ExtractConfig
from umair.extraction.stages import EncodeImages, decode_rows
from umair.image import preprocess
from umair.image.checkpoint import CheckpointError, load_encoder, load_init, save_encoder
from umair.image.encoder import DualEncoder, early_modules, encode
from umair.image.preprocess import PAD_VALUE, decode_image, fit_geometry, fit_image, fit_tensor, plan_decode
from umair.image.spec import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, read_exported_spec

SPEC = EncoderSpec(backbone="resnet18", image_size=32)


def _encoded(pixels: np.ndarray, fmt: str, mode: str = "RGB", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, fmt, **kw)
    return buf.getvalue()


def _bar(width: int, height: int) -> np.ndarray:
    """A red image with a blue left half: [height, width, 3] uint8."""
    img = np.zeros((height, width, 3), np.uint8)
    img[..., 0] = 220
    img[:, : width // 2] = (20, 40, 200)
    return img


# --------------------------------------------------------------------------- resize modes


def test_pad_keeps_the_aspect_ratio_of_a_known_shape():
    data = _encoded(_bar(300, 100), "PNG")  # 3:1
    out = decode_image(data, 48, resize="pad")
    assert out.shape == (48, 48, 3)
    assert fit_geometry(300, 100, 48, "pad") == (48, 16, 0, 0, 0, 16)
    content = ~(out == PAD_VALUE).all(axis=2)
    rows, cols = np.flatnonzero(content.any(axis=1)), np.flatnonzero(content.any(axis=0))
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (16, 31, 0, 47)  # 48 x 16: 3:1 kept
    assert (out[:16] == PAD_VALUE).all() and (out[32:] == PAD_VALUE).all()
    assert tuple(out[24, 4]) == (20, 40, 200) and tuple(out[24, 44]) == (220, 0, 0)
    tall = decode_image(_encoded(_bar(100, 300), "PNG"), 48, resize="pad")
    content = ~(tall == PAD_VALUE).all(axis=2)
    assert np.flatnonzero(content.any(axis=0)).tolist() == list(range(16, 32))  # 16 x 48


def test_squash_stretches_and_center_crop_keeps_the_centre():
    data = _encoded(_bar(300, 100), "PNG")
    squashed = decode_image(data, 48, resize="squash")
    assert not (squashed == PAD_VALUE).all(axis=2).any()  # fills the square
    assert tuple(squashed[0, 4]) == (20, 40, 200) and tuple(squashed[47, 44]) == (220, 0, 0)
    assert fit_geometry(300, 100, 48, "center_crop") == (144, 48, 48, 0, 0, 0)
    cropped = decode_image(data, 48, resize="center_crop")  # columns 100..199 of the original: both halves
    assert tuple(cropped[24, 2]) == (20, 40, 200) and tuple(cropped[24, 45]) == (220, 0, 0)
    # Without a mode: squash, as every encoder exported before resize modes (new encoders say pad).
    assert decode_image(data, 48).tolist() == squashed.tolist() and EncoderSpec().resize == "pad"
    with pytest.raises(ValueError, match="unknown resize mode 'stretch'"):
        decode_image(data, 48, resize="stretch")


@pytest.mark.parametrize("mode", ["squash", "pad", "center_crop"])
@pytest.mark.parametrize("shape", [(300, 100), (37, 90), (32, 32), (20, 10)])
def test_the_torch_fit_is_the_pillow_fit(mode, shape):
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (shape[1] // 5 + 1, shape[0] // 5 + 1, 3)), np.ones((5, 5, 1)))
    pixels = smooth[: shape[1], : shape[0]].astype(np.uint8)
    want = np.asarray(fit_image(Image.fromarray(pixels), 32, mode), np.int16)
    got = fit_tensor(torch.from_numpy(pixels).permute(2, 0, 1), 32, mode).permute(1, 2, 0).numpy().astype(np.int16)
    assert got.shape == want.shape == (32, 32, 3)
    assert np.abs(got - want).mean() < 1.5 and np.abs(got - want).max() <= 40  # antialiased bilinear, both


# --------------------------------------------------------------------------- normalisation


def test_normalisation_is_the_encoders_first_layer_and_not_in_the_state_dict():
    torch.manual_seed(0)
    net = DualEncoder(SPEC).eval()
    raw = DualEncoder(SPEC.model_copy(update={"normalize": "none"})).eval()
    raw.load_state_dict(net.state_dict())
    assert not any(k.startswith("normalize.") for k in net.state_dict())
    x = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(net(x).sem, raw((x - mean) / std).sem)
        assert not torch.allclose(net(x).sem, raw(x).sem)
    stats = SPEC.model_copy(update={"normalize": "dataset", "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)})
    assert DualEncoder(stats).normalize.std.flatten().tolist() == [0.25] * 3
    with pytest.raises(ValueError, match="normalize: dataset needs mean and std"):
        DualEncoder(EncoderSpec(backbone="resnet18", normalize="dataset"))
    with pytest.raises(ValueError, match="only with normalize: dataset"):
        EncoderSpec(mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))


def test_an_encoder_exported_before_resize_and_normalisation_keeps_its_behaviour(tmp_path):
    torch.manual_seed(2)
    legacy = SPEC.model_copy(update={"resize": "squash", "normalize": "none"})
    out = tmp_path / "old"
    save_encoder(DualEncoder(legacy), str(out))
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    # As written by the previous release: scheme 2, a spec without the new fields.
    old_spec = {k: manifest["spec"][k] for k in ("backbone", "image_size", "style_layers")}
    old_pre = {"resize": [32, 32], **preprocess.PREPROCESSING}
    old = {**manifest, "version_scheme": 2, "spec": old_spec, "preprocessing": old_pre}
    old.pop("init", None)
    from umair.image.checkpoint import encoder_version

    old["version"] = encoder_version(old)
    path.write_text(json.dumps(old))
    model, loaded = load_encoder(str(out))  # scheme 2 is still verified
    assert loaded["version"] == old["version"] and (model.spec.resize, model.spec.normalize) == ("squash", "none")
    assert model.normalize.identity and read_exported_spec(str(out)).resize == "squash"
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        reference = DualEncoder(legacy).eval()
        reference.load_state_dict(model.state_dict())
        torch.testing.assert_close(encode(model, x, "cpu"), encode(reference, x, "cpu"))
    new = save_encoder(DualEncoder(SPEC), str(tmp_path / "new"))
    assert new["spec"]["resize"] == "pad" and new["spec"]["normalize"] == "imagenet" and new["version_scheme"] == 3
    assert new["preprocessing"]["fit"] == "pad" and new["preprocessing"]["pad_value"] == list(PAD_VALUE)


# --------------------------------------------------------------------------- pretrained starts


def test_init_from_an_exported_encoder_restores_weights_and_the_head_by_tag(tmp_path):
    torch.manual_seed(3)
    trained = DualEncoder(SPEC, n_tags=3).eval()
    save_encoder(trained, str(tmp_path / "enc"), tag_vocabulary=["cat", "dog", "sky"])
    start = DualEncoder(SPEC, n_tags=3)
    record = load_init(start, str(tmp_path / "enc"), ["sky", "new", "cat"])
    manifest = json.loads((tmp_path / "enc" / "manifest.json").read_text())
    assert record == {"source": str(tmp_path / "enc"), "weights": manifest["weights_sha"], "head_tags": 2}
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(start.eval()(x).sem, trained(x).sem)
        torch.testing.assert_close(start.head.weight[0], trained.head.weight[2])  # sky
        torch.testing.assert_close(start.head.weight[2], trained.head.weight[0])  # cat
    with pytest.raises(CheckpointError, match="a resnet18 encoder cannot start a resnet34"):
        load_init(DualEncoder(EncoderSpec(backbone="resnet34", image_size=32)), str(tmp_path / "enc"))


def test_init_from_a_torchvision_state_dict_file_and_from_the_hub_cache(tmp_path, monkeypatch):
    torch.manual_seed(4)
    resnet = torchvision.models.resnet18()
    torch.save(resnet.state_dict(), tmp_path / "r18.pth")
    model = DualEncoder(SPEC)
    record = load_init(model, str(tmp_path / "r18.pth"))
    assert record["weights"] == __import__("hashlib").sha256((tmp_path / "r18.pth").read_bytes()).hexdigest()
    torch.testing.assert_close(model.stem[0].weight, resnet.conv1.weight)
    torch.testing.assert_close(model.layer4[1].bn2.running_var, resnet.layer4[1].bn2.running_var)
    with pytest.raises(CheckpointError, match=r"weights do not fit a resnet50 \((missing \d+ keys|size mismatch)"):
        load_init(DualEncoder(EncoderSpec(backbone="resnet50", image_size=32)), str(tmp_path / "r18.pth"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt: not a state dict"):
        load_init(DualEncoder(SPEC), str(tmp_path / "junk.pt"))
    with pytest.raises(CheckpointError, match="neither an exported encoder nor a readable file"):
        load_init(DualEncoder(SPEC), str(tmp_path / "absent"))
    # torchvision:NAME is the real hub path: a cached file loads offline ...
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    torch.save(resnet.state_dict(), hub / "checkpoints" / "resnet18-f37072fd.pth")
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))
    assert load_init(DualEncoder(SPEC), "torchvision:IMAGENET1K_V1")["weights"] == "torchvision:IMAGENET1K_V1"
    with pytest.raises(CheckpointError, match="resnet18 has no such weights"):
        load_init(DualEncoder(SPEC), "torchvision:IMAGENET9K")
    # ... and without the file and the internet the error says what to do.
    (hub / "checkpoints" / "resnet18-f37072fd.pth").unlink()

    def offline(*_a, **_k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(
        CheckpointError, match=r"cannot download https://download.pytorch.org/.*Offline, put the file in"
    ):
        load_init(DualEncoder(SPEC), "torchvision:IMAGENET1K_V1")


def test_early_modules_are_the_stem_up_to_the_named_block():
    model = DualEncoder(SPEC)
    assert early_modules(model, "stem") == [model.stem]
    assert early_modules(model, "layer2") == [model.stem, model.layer1, model.layer2]
    with pytest.raises(ValueError, match="cannot freeze up to 'layer4'"):
        early_modules(model, "layer4")


# --------------------------------------------------------------------------- GPU decode: planning and fallbacks


def test_decode_mode_settings():
    base = {"catalogue": "c", "output": "o"}
    assert ExtractConfig(**base).resolved_decode() == "cpu"
    assert ExtractConfig(**base, use_gpu=True).resolved_decode() == "gpu"
    assert ExtractConfig(**base, use_gpu=True, decode="cpu").resolved_decode() == "cpu"
    with pytest.raises(ValueError, match="decode: gpu .* needs use_gpu: true"):
        ExtractConfig(**base, decode="gpu")


def _catalogue(tmp_path) -> tuple[list[str], dict[str, str]]:
    rng = np.random.default_rng(5)
    photo = np.kron(rng.integers(0, 256, (9, 14, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # 112 x 72
    jpeg = _encoded(photo, "JPEG", quality=90)
    files = {
        "jpeg": _encoded(photo, "JPEG", quality=90),
        "grey_jpeg": _encoded(photo, "JPEG", "L"),
        "progressive": _encoded(photo[:40], "JPEG", progressive=True),
        "png": _encoded(photo, "PNG"),
        "cmyk_jpeg": _encoded(photo, "JPEG", "CMYK"),
        "truncated_jpeg": _encoded(photo, "JPEG")[:-300],
        "jpeg_without_scan": jpeg[: jpeg.index(b"\xff\xda")] + b"\xff\xd9",  # a sound header, no image data
        "fake_jpeg": b"\xff\xd8\xff" + bytes(rng.integers(0, 256, 500, dtype=np.uint8)) + b"\xff\xd9",
        "empty": b"",
        "text": b"<html>not found</html>",
    }
    uris = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        uris.append(str(tmp_path / name))
    uris.append(str(tmp_path / "missing.jpg"))
    routes = {
        "jpeg": "gpu",
        "grey_jpeg": "gpu",
        "progressive": "gpu",
        "jpeg_without_scan": "gpu",
        **{k: "cpu" for k in ("png", "cmyk_jpeg", "truncated_jpeg", "fake_jpeg", "empty", "text")},
    }
    assert {k: plan_decode(v) for k, v in files.items()} == routes
    return uris, routes


def test_gpu_decode_path_gives_the_cpu_paths_rows_with_the_decoder_injected(tmp_path):
    uris, routes = _catalogue(tmp_path)
    batch = {"illust_id": np.arange(1, len(uris) + 1), "image_uri": np.array(uris, dtype=object)}
    kw = dict(image_size=32, max_pixels=10_000_000, max_bytes=1_000_000, storage_config=StorageConfig(), retry_s=5.0)
    cpu_rows = decode_rows(batch, **kw, resize="pad")
    gpu_rows = decode_rows(batch, **kw, resize="pad", decode="gpu")
    assert "image" not in gpu_rows and "data" not in cpu_rows
    assert gpu_rows["route"].tolist() == [routes.get(u.rsplit("/", 1)[1], "") for u in uris]  # "" = read failed
    assert gpu_rows["stage"].tolist() == ["" for _ in uris[:-1]] + ["read"]  # only the read failure so far

    torch.manual_seed(0)
    spec = SPEC.model_dump(mode="json")
    cpu_actor = EncodeImages(None, spec, 0, False, 1, StorageConfig())
    gpu_actor = EncodeImages(None, spec, 0, False, 1, StorageConfig(), decode="gpu", jpeg_device="cpu")
    want, got = cpu_actor(cpu_rows), gpu_actor(gpu_rows)
    for key in ("ok", "stage", "reason", "error"):
        assert got[key].tolist() == want[key].tolist(), key
    names = [u.rsplit("/", 1)[1] for u in uris]
    good = [n for n, ok in zip(names, want["ok"]) if ok]
    assert good == ["jpeg", "grey_jpeg", "progressive", "png", "cmyk_jpeg"]
    failed = {n: (s, r) for n, s, r in zip(names, want["stage"], want["reason"]) if s}
    assert failed == {
        "truncated_jpeg": ("decode", "corrupt"),
        "jpeg_without_scan": ("decode", "corrupt"),
        "fake_jpeg": ("decode", "not_an_image"),
        "empty": ("decode", "empty"),
        "text": ("decode", "not_an_image"),
        "missing.jpg": ("read", "missing"),
    }
    # 3 JPEGs by the JPEG decoder; png and cmyk by the CPU decoder; the JPEG decoder's refusal
    # (jpeg_without_scan) and the cpu-routed bad files judged by the CPU decoder, as on the CPU path.
    assert dict(gpu_actor.counts) == {"jpeg": 3, "cpu": 2, "failed": 5}
    ok = want["ok"]
    assert not np.allclose(got["sem"][ok], 0)
    cos = (got["sem"][ok] * want["sem"][ok]).sum(1) / (
        np.linalg.norm(got["sem"][ok], axis=1) * np.linalg.norm(want["sem"][ok], axis=1)
    )
    assert cos.min() > 0.99  # same image up to resampling details
    np.testing.assert_array_equal(got["sem"][~ok], 0)
    assert "data" not in got and "route" not in got and "image" not in got


def test_a_batch_the_jpeg_decoder_refuses_is_retried_row_by_row(tmp_path, monkeypatch):
    import torchvision.io

    uris, _ = _catalogue(tmp_path)
    batch = {"illust_id": np.arange(1, 5), "image_uri": np.array([uris[0], uris[6], uris[1], uris[2]], dtype=object)}
    kw = dict(image_size=32, max_pixels=10_000_000, max_bytes=1_000_000, storage_config=StorageConfig(), retry_s=5.0)
    rows = decode_rows(batch, **kw, decode="gpu")
    assert rows["route"].tolist() == ["gpu"] * 4  # the JPEG without a scan looks sound from its header
    calls = []
    real = torchvision.io.decode_jpeg

    def spy(data, **kwargs):
        calls.append(len(data) if isinstance(data, list) else 1)
        return real(data, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", spy)
    actor = EncodeImages(
        None, SPEC.model_dump(mode="json"), 0, False, 1, StorageConfig(), decode="gpu", jpeg_device="cpu"
    )
    out = actor(rows)
    assert calls == [4, 1, 1, 1, 1]  # the batch, then each row
    assert out["ok"].tolist() == [True, False, True, True] and out["reason"][1] == "corrupt"
    assert dict(actor.counts) == {"jpeg": 3, "failed": 1}
