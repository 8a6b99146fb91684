"""Reliability: which storage failures are a row's problem, which are retried and which
stop a job at once; and an encoder version that changes with every setting that changes
the encoder's outputs (and with nothing else)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from umair import storage
from umair.config import StorageConfig
from umair.extraction.stages import (
    PermanentReadError,
    decode_rows,
    read_image_bytes,
    write_parts,
)
from umair.image import preprocess
from umair.image.checkpoint import (
    CheckpointError,
    encoder_version,
    load_encoder,
    save_encoder,
)
from umair.image.encoder import DualEncoder
from umair.image.spec import NOT_OUTPUT_FIELDS, EncoderSpec
from umair.storage import StorageError, StorageSettings, with_retries

UNREACHABLE = StorageSettings(
    endpoint="http://127.0.0.1:9", region="us-east-1", retries=1, connect_timeout_s=1, request_timeout_s=2
)


def _png(path) -> str:
    Image.new("RGB", (20, 20), (200, 30, 30)).save(path, "PNG")
    return str(path)


def _batch(uris: list) -> dict[str, np.ndarray]:
    return {"illust_id": np.arange(1, len(uris) + 1), "image_uri": np.array(uris, dtype=object)}


def _decode(uris: list, retry_s: float = 30.0, config: StorageConfig | None = None) -> tuple[dict, float]:
    start = time.monotonic()
    out = decode_rows(
        _batch(uris),
        image_size=16,
        max_pixels=10_000_000,
        max_bytes=1_000_000,
        storage_config=config or StorageConfig(),
        retry_s=retry_s,
    )
    return out, time.monotonic() - start


# --------------------------------------------------------------------------- read failures are rows


def test_decode_rows_makes_permanent_read_failures_error_rows_at_once(tmp_path):
    good = _png(tmp_path / "good.png")
    folder = tmp_path / "a-folder"
    folder.mkdir()
    missing = str(tmp_path / "missing.png")
    out, elapsed = _decode([good, str(folder), "", missing], retry_s=30)
    assert elapsed < 5, f"took {elapsed:.1f}s: a permanent failure was retried"
    assert out["ok"].tolist() == [True, False, False, False]
    assert int(out["ok"].sum()) == 1
    assert Counter(out["reason"][~out["ok"]]) == {"not_a_file": 1, "bad_uri": 1, "missing": 1}
    assert out["stage"].tolist() == ["", "read", "read", "read"]
    assert out["reason"].tolist() == ["", "not_a_file", "bad_uri", "missing"]
    assert out["error"].tolist() == [
        "",
        f"not_a_file: {folder} is a directory, not a file",
        "bad_uri: empty image_uri",
        f"missing: no such file or object: {missing}",
    ]
    assert out["image"].shape == (4, 16, 16, 3) and out["image"][0].tolist()[0][0] == [200, 30, 30]
    assert not out["image"][1:].any()


@pytest.mark.parametrize(
    ("uri", "reason", "error"),
    [
        ("", "bad_uri", "bad_uri: empty image_uri"),
        ("   ", "bad_uri", "bad_uri: empty image_uri"),
        (None, "no_image", "no_image: the catalogue has no image_uri"),  # NULL: no image, not an error row
        (float("nan"), "no_image", "no_image: the catalogue has no image_uri"),
        ("s3://", "bad_uri", "bad_uri: s3://: no bucket (expected s3://bucket/key)"),
        ("s3:///key.png", "bad_uri", "bad_uri: s3:///key.png: no bucket (expected s3://bucket/key)"),
        (
            "s3://bucket-only",
            "bad_uri",
            "bad_uri: s3://bucket-only: names a bucket, not an object (expected s3://bucket/key)",
        ),
        (
            "s3://bucket-only/",
            "bad_uri",
            "bad_uri: s3://bucket-only/: names a bucket, not an object (expected s3://bucket/key)",
        ),
        ("s3://b//a.png", "bad_uri", "bad_uri: s3://b//a.png: empty path component (expected s3://bucket/key)"),
        ("s3://b/folder/", "not_a_file", "not_a_file: s3://b/folder/ names a prefix (folder), not an object"),
        (
            "gs://b/a.png",
            "bad_uri",
            "bad_uri: gs://b/a.png: unsupported URI scheme (expected a local path or s3://bucket/key)",
        ),
        (
            "http://example.com/a.png",
            "bad_uri",
            "bad_uri: http://example.com/a.png: unsupported URI scheme (expected a local path or s3://bucket/key)",
        ),
        ("file://", "bad_uri", "bad_uri: file://: no path after file://"),
        ("a\x00b.png", "bad_uri", "bad_uri: 'a\\x00b.png': NUL character in the URI"),
    ],
)
def test_malformed_uris_are_bad_uri_rows_without_any_io(uri, reason, error):
    # An unreachable endpoint: any attempt to reach storage would be retried for 30 s.
    config = StorageConfig(endpoint=UNREACHABLE.endpoint, region="us-east-1", retries=1)
    out, elapsed = _decode([uri], retry_s=30, config=config)
    assert elapsed < 1
    assert (out["ok"].tolist(), out["stage"].tolist(), out["reason"].tolist(), out["error"].tolist()) == (
        [False],
        ["read"],
        [reason],
        [error],
    )


def test_other_permanent_local_failures_are_rows(tmp_path):
    a_file = _png(tmp_path / "file.png")
    loop = tmp_path / "loop.png"
    os.symlink(loop, loop)
    long_name = str(tmp_path / ("x" * 300 + ".png"))
    cases = {
        f"{a_file}/inside.png": (
            "not_a_file",
            f"not_a_file: {a_file}/inside.png: a parent in the path is a file, not a directory",
        ),
        str(loop): ("not_a_file", f"not_a_file: {loop}: too many levels of symbolic links"),
        long_name: ("bad_uri", f"bad_uri: {long_name[:80]}...: file name too long"),
        "file://" + a_file: ("", ""),
    }
    out, elapsed = _decode(list(cases), retry_s=30)
    assert elapsed < 5
    assert list(zip(out["reason"].tolist(), out["error"].tolist())) == list(cases.values())
    assert out["ok"].tolist() == [False, False, False, True]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_file_is_a_permission_denied_row(tmp_path):
    path = _png(tmp_path / "secret.png")
    os.chmod(path, 0)
    out, elapsed = _decode([path], retry_s=30)
    assert elapsed < 5 and out["error"].tolist() == [f"permission_denied: {path}: permission denied"]


def test_read_image_bytes_raises_permanent_read_error_with_its_reason(tmp_path):
    with pytest.raises(PermanentReadError) as info:
        read_image_bytes(str(tmp_path), StorageSettings(), 1000, 30)
    assert info.value.reason == "not_a_file" and str(info.value) == f"not_a_file: {tmp_path} is a directory, not a file"
    big = tmp_path / "big.png"
    big.write_bytes(b"x" * 2000)
    with pytest.raises(PermanentReadError, match=r"^too_large: file is larger than max_image_bytes=1000$"):
        read_image_bytes(str(big), StorageSettings(), 1000, 30)


def test_s3_rows_missing_object_and_missing_bucket_are_rows_but_rejected_credentials_stop_at_once(
    s3_server, monkeypatch
):
    good = s3_server.uri("faults", "good.png")
    buf = Image.new("RGB", (20, 20), (10, 200, 10))
    import io

    data = io.BytesIO()
    buf.save(data, "PNG")
    storage.write_bytes(good, data.getvalue(), s3_server.settings)
    config = StorageConfig(endpoint=s3_server.endpoint, region="us-east-1", retries=1)
    missing, no_bucket = s3_server.uri("faults", "missing.png"), "s3://umair-no-such-bucket/a.png"
    out, elapsed = _decode([good, missing, no_bucket, s3_server.uri("faults") + "/"], retry_s=30, config=config)
    assert elapsed < 5
    assert out["ok"].tolist() == [True, False, False, False]
    assert out["error"].tolist()[1:] == [
        f"missing: no such file or object: {missing}",
        "no_bucket: s3://umair-no-such-bucket/a.png: the bucket umair-no-such-bucket does not exist",
        f"not_a_file: {s3_server.uri('faults')}/ names a prefix (folder), not an object",
    ]
    # Credentials are the job's, not the row's: every row would fail alike, so the job stops at once.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong-secret")
    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        _decode([good], retry_s=30, config=config)
    assert time.monotonic() - start < 5
    assert str(info.value) == (
        f"cannot read {good} at endpoint {s3_server.endpoint}: the server rejected the credentials. Check "
        "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE / the instance profile) and that they may read this prefix"
    )


def test_an_unreachable_endpoint_is_retried_with_backoff_then_stops_the_job(monkeypatch, capsys):
    monkeypatch.setattr(storage, "_last_retry_note", 0.0)
    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        read_image_bytes("s3://b/k.png", UNREACHABLE, 1000, retry_s=2)
    elapsed = time.monotonic() - start
    assert 1.0 < elapsed < 8, elapsed  # slept 0.25 + 0.5 + 1 s between attempts
    assert not isinstance(info.value, PermanentReadError)
    assert str(info.value) == (
        "read s3://b/k.png: gave up after 2s of retries: cannot read s3://b/k.png at endpoint "
        "http://127.0.0.1:9: the storage endpoint could not be reached; is it running and is the endpoint right?"
    )
    assert (
        "[storage] transient storage error, retrying (0s of up to 2s): read s3://b/k.png: cannot read"
        in capsys.readouterr().err
    )


# --------------------------------------------------------------------------- what with_retries retries


class Flaky:
    """A storage call that fails ``failures`` times with ``error``, then returns "done"."""

    def __init__(self, error: BaseException, failures: int = 10**9):
        self.error, self.failures, self.calls = error, failures, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "done"


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
        OSError(
            "When reading information for key 'k' in bucket 'b': AWS Error SERVICE_UNAVAILABLE during HeadObject operation: "
            "Service Unavailable (HTTP 503)"
        ),
        OSError("AWS Error INTERNAL_FAILURE during GetObject operation: We encountered an internal error (HTTP 500)"),
        TimeoutError(errno.ETIMEDOUT, "Connection timed out"),
    ],
    ids=["refused", "503", "500", "timeout"],
)
def test_transient_errors_are_retried_with_backoff(error):
    op = Flaky(error, failures=2)
    start = time.monotonic()
    assert with_retries(op, "read s3://b/k", 30) == "done"
    assert op.calls == 3 and 0.7 < time.monotonic() - start < 3  # slept 0.25 s, then 0.5 s


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (errno.ENOSPC, "no space left on device (ENOSPC), not retried; free space or point the output elsewhere"),
        (errno.EROFS, "read-only file system (EROFS), not retried; make it writable or point the output elsewhere"),
        (
            errno.EDQUOT,
            "disk quota exceeded (EDQUOT), not retried; free space, raise the quota or point the output elsewhere",
        ),
    ],
)
def test_full_or_read_only_storage_is_not_retried(code, message):
    op = Flaky(OSError(code, os.strerror(code)))
    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        with_retries(op, "write /out/features/part.parquet", 30)
    assert time.monotonic() - start < 1 and op.calls == 1
    assert str(info.value) == f"write /out/features/part.parquet: {message} ([Errno {code}] {os.strerror(code)})"
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == code


def test_a_real_enospc_from_the_kernel_is_not_retried():
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")

    def write() -> None:
        with storage.storage_errors("/dev/full", "write"), open("/dev/full", "wb") as f:
            f.write(b"x" * 4096)

    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        with_retries(write, "write /dev/full", 30)
    assert time.monotonic() - start < 1
    assert str(info.value) == (
        "write /dev/full: no space left on device (ENOSPC), not retried; free space or point the output "
        f"elsewhere (cannot write /dev/full: [Errno {errno.ENOSPC}] No space left on device)"
    )


def _raise_through_storage_errors(uri: str, op: str, error: BaseException, calls: list):
    def call():
        calls.append(1)
        with storage.storage_errors(uri, op, UNREACHABLE):
            raise error

    return call


@pytest.mark.parametrize(
    ("uri", "op", "error", "message"),
    [
        (
            "s3://b/k.png",
            "read",
            OSError(
                "When reading information for key 'k.png' in bucket 'b': AWS Error ACCESS_DENIED during HeadObject operation: "
                "No response body."
            ),
            (
                "cannot read s3://b/k.png at endpoint http://127.0.0.1:9: the server rejected the credentials. Check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE / the instance profile) and that they may read this prefix"
            ),
        ),
        (
            "s3://b/out/part.parquet",
            "write",
            OSError(
                "When uploading part for key 'out/part.parquet' in bucket 'b': AWS Error SIGNATURE_DOES_NOT_MATCH during "
                "UploadPart operation: The request signature we calculated does not match the signature you provided."
            ),
            (
                "cannot write s3://b/out/part.parquet at endpoint http://127.0.0.1:9: the server rejected the credentials. Check "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE / the instance profile) and that they may write this prefix"
            ),
        ),
        (
            "s3://nobucket/out/part.parquet",
            "write",
            OSError(
                "When completing multiple part upload for key 'out/part.parquet' in bucket 'nobucket': AWS Error NO_SUCH_BUCKET "
                "during CompleteMultipartUpload operation: The specified bucket does not exist"
            ),
            "cannot write s3://nobucket/out/part.parquet at endpoint http://127.0.0.1:9: the bucket does not exist",
        ),
        (
            "/data/missing.parquet",
            "read",
            FileNotFoundError(errno.ENOENT, "No such file or directory"),
            "cannot read /data/missing.parquet: no such file or object",
        ),
    ],
    ids=["access-denied", "bad-signature", "no-bucket", "missing"],
)
def test_rejected_credentials_and_missing_buckets_are_not_retried(uri, op, error, message):
    calls: list = []
    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        with_retries(_raise_through_storage_errors(uri, op, error, calls), f"{op} {uri}", 30)
    assert time.monotonic() - start < 1 and len(calls) == 1
    assert str(info.value) == message


def test_a_permanent_error_outside_storage_errors_is_wrapped_naming_the_operation():
    op = Flaky(FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/y.json"))
    with pytest.raises(StorageError) as info:
        with_retries(op, "read /x/y.json", 30)
    assert op.calls == 1 and str(info.value) == "read /x/y.json: [Errno 2] No such file or directory: '/x/y.json'"


# --------------------------------------------------------------------------- a real full / read-only disk


@pytest.fixture
def tmpfs(tmp_path):
    """Mount tiny tmpfs file systems (needs root and mount; skipped elsewhere)."""
    mounted = []

    def mount(name: str, options: str):
        if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("mount"):
            pytest.skip("mounting a tmpfs needs root")
        path = tmp_path / name
        path.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True, check=False
        )
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _good_rows(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "illust_id": np.arange(n),
        "ok": np.ones(n, bool),
        "sem": rng.standard_normal((n, 64)).astype(np.float32),
        "image_uri": np.array([""] * n, dtype=object),
        "stage": np.array([""] * n, dtype=object),
        "reason": np.array([""] * n, dtype=object),
        "error": np.array([""] * n, dtype=object),
    }


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("size=64k", "no space left on device (ENOSPC), not retried"),
        ("size=64k,ro", "read-only file system (EROFS), not retried"),
    ],
    ids=["full", "read-only"],
)
def test_the_extraction_writer_on_a_full_or_read_only_disk_stops_at_once(tmpfs, options, message):
    out = tmpfs("out", options)
    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        write_parts(_good_rows(4000), str(out), "run1", {"umair.sem.dim": "64"}, StorageConfig(), retry_s=30)
    assert time.monotonic() - start < 2
    text = str(info.value)
    assert text.startswith(f"write {out}/_tmp/run1/features/") and f".parquet: {message};" in text
    if "ro" not in options:
        assert os.listdir(out / "_tmp" / "run1" / "features") == []  # the half-written temp file is gone


# --------------------------------------------------------------------------- the encoder version


BASE = EncoderSpec(backbone="resnet18", image_size=32)
MEASURED = BASE.model_copy(update={"normalize": "dataset", "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.2, 0.2)})
# One other value for every field that changes outputs, and the spec it is changed in; a new
# EncoderSpec field must be added here or to NOT_OUTPUT_FIELDS.
OTHER_VALUE = {
    "backbone": (BASE, "resnet34"),
    "image_size": (BASE, 48),
    "style_layers": (BASE, ("layer2.0", "layer2.1")),
    "resize": (BASE, "squash"),
    "normalize": (BASE, "none"),
    "mean": (MEASURED, (0.5, 0.4, 0.2)),
    "std": (MEASURED, (0.2, 0.25, 0.2)),
}


def _version(spec: EncoderSpec) -> str:
    return load_encoder(None, spec)[1]["version"]


def test_every_encoder_spec_field_is_versioned_or_declared_output_neutral():
    assert set(OTHER_VALUE) == set(EncoderSpec.model_fields) - NOT_OUTPUT_FIELDS


@pytest.mark.parametrize("field", sorted(OTHER_VALUE))
def test_changing_an_output_affecting_field_changes_the_version(field):
    base, value = OTHER_VALUE[field]
    other = EncoderSpec(**{**base.model_dump(), field: value})
    assert getattr(other, field) != getattr(base, field)
    assert _version(other) != _version(base)


def test_every_resize_mode_and_normalisation_is_its_own_version_and_equal_ones_share_one():
    modes = {m: _version(BASE.model_copy(update={"resize": m})) for m in ("squash", "pad", "center_crop")}
    norms = {n: _version(BASE.model_copy(update={"normalize": n})) for n in ("none", "imagenet")}
    versions = [*modes.values(), *norms.values(), _version(MEASURED)]
    assert len(set(versions)) == len(versions) - 1 and modes["pad"] == norms["imagenet"] == _version(BASE)
    # Equal outputs, one version: "none" is "dataset" with mean 0 and std 1.
    unit = BASE.model_copy(update={"normalize": "dataset", "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)})
    assert _version(unit) == norms["none"]


def test_the_pretrained_start_changes_the_version():
    _, manifest = load_encoder(None, BASE)
    starts = [None, {"source": "a", "weights": "torchvision:IMAGENET1K_V2"}, {"source": "b", "weights": "ab" * 32}]
    versions = [encoder_version({**manifest, "init": start}) for start in starts]
    assert len(set(versions)) == 3 and versions[0] == manifest["version"]
    # Where it came from is provenance: the same start weights from another place is the same encoder.
    assert encoder_version({**manifest, "init": {**starts[2], "source": "c", "head_tags": 7}}) == versions[2]


def test_same_spec_same_version_and_equivalent_specs_share_one():
    version = _version(BASE)
    assert version == _version(EncoderSpec(backbone="resnet18", image_size=32))
    assert version.startswith("resnet18-32px-random-") and len(version.rsplit("-", 1)[1]) == 12
    # None and the explicit default are one encoder; e_STY max-pools over blocks, so their order does not matter
    assert _version(BASE.model_copy(update={"style_layers": ("layer1.0", "layer1.1")})) == version
    assert _version(BASE.model_copy(update={"style_layers": ("layer1.1", "layer1.0")})) == version
    assert _version(BASE.model_copy(update={"style_layers": ("layer1.0",)})) != version


def test_weights_preprocessing_and_pooling_change_the_version_provenance_does_not():
    _, manifest = load_encoder(None, BASE)
    version = encoder_version(manifest)
    assert version == manifest["version"]
    changed = {
        "torchvision weights": {"weights_sha": "IMAGENET1K_V1-init"},
        "trained weights": {"weights_sha": "ab" * 32},
        "interpolation": {"preprocessing": {**manifest["preprocessing"], "interpolation": "bicubic"}},
        "normalisation": {"preprocessing": {**manifest["preprocessing"], "scale": "imagenet mean/std"}},
        "style pooling": {"pooling": {**manifest["pooling"], "sty": "mean over the blocks"}},
        "semantic pooling": {"pooling": {**manifest["pooling"], "sem": "max over H'xW'"}},
    }
    versions = {name: encoder_version({**manifest, **update}) for name, update in changed.items()}
    assert version not in versions.values() and len(set(versions.values())) == len(changed)
    assert versions["torchvision weights"].startswith("resnet18-32px-IMAGENET1K_V1-")
    assert versions["trained weights"].startswith("resnet18-32px-") and "random" not in versions["trained weights"]
    neutral = {
        "created_at": "2030-01-01T00:00:00+00:00",
        "tag_vocab_hash": "x",
        "training_data_version": "v9",
        "source": "elsewhere",
        "sem_dim": 1,
        "sty_dim": 2,
        "style_layers": ["ignored"],
        "version": "stale",
    }
    assert encoder_version({**manifest, **neutral}) == version


def test_the_resize_filter_is_both_used_and_versioned(monkeypatch):
    data = _png_bytes()
    before, version = preprocess.decode_image(data, 7), _version(BASE)
    monkeypatch.setitem(preprocess.PREPROCESSING, "interpolation", "nearest")
    assert not np.array_equal(preprocess.decode_image(data, 7), before)
    assert _version(BASE) != version


def _png_bytes() -> bytes:
    import io

    rng = np.random.default_rng(3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), "RGB").save(buf, "PNG")
    return buf.getvalue()


def test_an_exported_manifest_records_the_full_spec_and_its_version_recomputes(tmp_path):
    spec = EncoderSpec(backbone="resnet18", image_size=32, style_layers=("layer1.1",))
    out = tmp_path / "enc"
    written = save_encoder(DualEncoder(spec, n_tags=3), str(out), tag_vocab_hash="abc")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == written
    assert manifest["spec"] == {
        "backbone": "resnet18",
        "image_size": 32,
        "style_layers": ["layer1.1"],
        "resize": "pad",
        "normalize": "imagenet",
        "mean": None,
        "std": None,
    }
    assert set(manifest["spec"]) == set(EncoderSpec.model_fields)
    assert manifest["preprocessing"] == {
        "resize": [32, 32],
        "fit": "pad",
        "pad_value": list(preprocess.PAD_VALUE),
        **preprocess.PREPROCESSING,
    }
    assert manifest["version"] == encoder_version(manifest) == load_encoder(str(out))[1]["version"]
    assert manifest["version"].startswith("resnet18-32px-") and len(manifest["version"]) == len("resnet18-32px-") + 12
    # Another export of other weights: another version.
    other = save_encoder(DualEncoder(spec), str(tmp_path / "enc2"))
    assert other["weights_sha"] != manifest["weights_sha"] and other["version"] != manifest["version"]


def test_a_manifest_edited_after_export_is_refused_and_an_old_one_keeps_its_version(tmp_path):
    out = tmp_path / "enc"
    save_encoder(DualEncoder(BASE), str(out))
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "spec": {**manifest["spec"], "style_layers": ["layer1.0"]}}))
    edited = encoder_version({**manifest, "spec": {**manifest["spec"], "style_layers": ["layer1.0"]}})
    with pytest.raises(CheckpointError) as info:
        load_encoder(str(out))
    assert str(info.value) == (
        f"{path}: recorded version {manifest['version']} does not match the manifest's contents ({edited}); was it edited after export?"
    )
    old = {k: v for k, v in manifest.items() if k not in ("version_scheme", "pooling")}
    path.write_text(json.dumps({**old, "version": "resnet18-32px-0123456789ab"}))
    assert load_encoder(str(out))[1]["version"] == "resnet18-32px-0123456789ab"
