"""Image decoding and preprocessing, defined once for pretext training and extraction.

``decode_image`` turns file bytes into an RGB uint8 array of size S×S (the encoder's
input) by the encoder's resize mode (:func:`fit_geometry`: ``squash``, ``pad`` or
``center_crop``), whatever the file: JPEG (incl. CMYK), PNG (8/16-bit, palette with
transparency, greyscale, RGBA), GIF (first frame), WebP... Transparent pixels are
composited on white. Absurd dimensions are refused from the header, before any pixel
is decoded. Failures raise :class:`DecodeError` with a short reason:

- ``empty``: zero bytes;
- ``not_an_image``: no known image format (random bytes, HTML error pages...);
- ``too_large``: the header claims more than ``max_pixels`` pixels (decompression bombs);
- ``corrupt``: a known format that fails to decode (truncated files, bad chunks...).

Samples deeper than 8 bits are scaled to 8 bits by their bit depth: 16-bit files
(``I;16*``) by 65535, float images (``F``) in [0, 1] by 1, other 32-bit integer images
by 65535 when they exceed 255 (Pillow opens some 16-bit files as ``I``), else by 255.

The GPU decode path of extraction (``decode: gpu``) decodes JPEGs with
``torchvision.io.decode_jpeg`` and fits them with :func:`fit_tensor`: the same geometry
(:func:`fit_geometry`), the same pad colour, bilinear with antialiasing like Pillow's
(a pixel may differ by a few levels from :func:`decode_image`). Which rows may take it
is decided from the bytes by :func:`plan_decode`; every other row, and every row the
JPEG decoder refuses, is decoded by :func:`decode_image`.
"""

from __future__ import annotations

import io
import warnings
from typing import Literal, NamedTuple

import numpy as np
from PIL import Image, ImageFile

from umair.errors import UmairError

MAX_PIXELS = 64_000_000  # refuse larger images from their header (decompression bombs)

# What decode_image (and umair.image.encoder.encode's uint8 → float step) does to every
# image; recorded in encoder manifests and hashed into the encoder version, so a change
# here gives new versions. decode_image takes its resampling filter from "interpolation".
PREPROCESSING: dict[str, str] = {
    "interpolation": "bilinear",
    "scale": "0..1",  # x / 255; mean/std normalisation is the encoder's first layer (EncoderSpec.normalize)
    "mode": "RGB",
    "transparency": "composited on white",
    "deep_samples": "scaled to 8 bits by bit depth",
    "frames": "first",
}
_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST, "lanczos": Image.LANCZOS}
PAD_VALUE = (128, 128, 128)  # the neutral grey of ``pad`` (RGB, uint8)
# decode_image's default when a caller names no mode: "squash", what every encoder exported
# before resize modes used. New encoders default to "pad" (EncoderSpec.resize); callers that
# decode for an encoder pass its spec.resize.
DEFAULT_RESIZE = "squash"
RESIZE_MODES = ("squash", "pad", "center_crop")


def preprocessing_manifest(size: int, resize: str | None = None) -> dict:
    """The manifest's ``preprocessing`` entry for an encoder whose images are fitted to
    size × size by ``resize`` (None: the entry of encoders exported before resize modes,
    which squashed)."""
    if resize is None:
        return {"resize": [size, size], **PREPROCESSING}
    pad = {"pad_value": list(PAD_VALUE)} if resize == "pad" else {}
    return {"resize": [size, size], "fit": resize, **pad, **PREPROCESSING}


class Fit(NamedTuple):
    """How a W × H image becomes S × S: resize to ``width`` × ``height``, then take the
    S × S window at (``crop_left``, ``crop_top``) (center_crop), or paste the image at
    (``pad_left``, ``pad_top``) on an S × S canvas of :data:`PAD_VALUE` (pad)."""

    width: int
    height: int
    crop_left: int
    crop_top: int
    pad_left: int
    pad_top: int


def fit_geometry(width: int, height: int, size: int, mode: str) -> Fit:
    """The :class:`Fit` of a ``width`` × ``height`` image into ``size`` × ``size``:

    - ``squash``: resize to S × S (the aspect ratio is lost);
    - ``pad``: the longer side becomes S, the shorter ``round(short · S / long)`` (≥ 1),
      centred on the grey canvas: a 300 × 100 image at S = 48 is 48 × 16 at rows 16..31;
    - ``center_crop``: the shorter side becomes S, the longer ``round(long · S / short)``,
      and the centre S × S is kept.
    """
    if width <= 0 or height <= 0 or size <= 0:
        raise ValueError(f"cannot fit a {width}x{height} image into {size}x{size}")
    if mode == "squash":
        return Fit(size, size, 0, 0, 0, 0)
    if mode == "pad":
        scale = size / max(width, height)
        w, h = min(size, max(1, round(width * scale))), min(size, max(1, round(height * scale)))
        return Fit(w, h, 0, 0, (size - w) // 2, (size - h) // 2)
    if mode == "center_crop":
        scale = size / min(width, height)
        w, h = max(size, round(width * scale)), max(size, round(height * scale))
        return Fit(w, h, (w - size) // 2, (h - size) // 2, 0, 0)
    raise ValueError(f"unknown resize mode {mode!r} (expected squash, pad or center_crop)")


def fit_image(img: Image.Image, size: int, mode: str) -> Image.Image:
    """An RGB PIL image fitted to ``size`` × ``size`` by ``mode`` (:func:`fit_geometry`)."""
    fit = fit_geometry(img.width, img.height, size, mode)
    if (fit.width, fit.height) != img.size:
        img = img.resize((fit.width, fit.height), _RESAMPLE[PREPROCESSING["interpolation"]])
    if mode == "center_crop":
        img = img.crop((fit.crop_left, fit.crop_top, fit.crop_left + size, fit.crop_top + size))
    elif mode == "pad" and img.size != (size, size):
        canvas = Image.new("RGB", (size, size), PAD_VALUE)
        canvas.paste(img, (fit.pad_left, fit.pad_top))
        img = canvas
    return img


def fit_tensor(image, size: int, mode: str):
    """The torch twin of :func:`fit_image` (the GPU decode path): ``image`` [3, H, W] uint8
    on any device → [3, size, size] uint8 on that device; same geometry and pad colour,
    bilinear with antialiasing (a few levels from Pillow's at most)."""
    import torch
    import torch.nn.functional as F

    _, h, w = image.shape
    fit = fit_geometry(w, h, size, mode)
    out = image
    if (fit.width, fit.height) != (w, h):
        resized = F.interpolate(
            image[None].float(), size=(fit.height, fit.width), mode="bilinear", antialias=True, align_corners=False
        )[0]
        out = resized.round_().clamp_(0, 255).to(torch.uint8)
    if mode == "center_crop":
        out = out[:, fit.crop_top : fit.crop_top + size, fit.crop_left : fit.crop_left + size]
    elif mode == "pad" and out.shape[1:] != (size, size):
        canvas = torch.tensor(PAD_VALUE, dtype=torch.uint8, device=image.device)[:, None, None].repeat(1, size, size)
        canvas[:, fit.pad_top : fit.pad_top + fit.height, fit.pad_left : fit.pad_left + fit.width] = out
        out = canvas
    return out.contiguous()


class DecodeError(UmairError, ValueError):
    """The bytes are not a decodable image; ``reason`` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


def _deep_to_l(img: Image.Image) -> Image.Image:
    """A single-channel image deeper than 8 bits (I;16*, I, F) as 8-bit greyscale ``L``."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        top = 65535.0
    elif img.mode == "F" and arr.size and np.nanmin(arr) >= 0.0 and np.nanmax(arr) <= 1.0:
        top = 1.0
    else:
        top = 65535.0 if arr.size and np.nanmax(arr) > 255 else 255.0
    scaled = np.nan_to_num(arr / top * 255.0, nan=0.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA") if ("transparency" in img.info or img.mode == "PA") else img.convert("RGB")
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        img = _deep_to_l(img)
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def plan_decode(data: bytes, max_pixels: int = MAX_PIXELS) -> Literal["gpu", "cpu"]:
    """Where the GPU decode path decodes ``data``, from its header alone: ``gpu`` for a
    complete JPEG (SOI ... EOI) in RGB (YCbCr) or greyscale within ``max_pixels``; ``cpu``
    (:func:`decode_image`, which also names the error of an undecodable file) for every
    other file: PNG, WebP, CMYK JPEGs, truncated JPEGs, empty or unknown bytes."""
    if len(data) < 4 or not data.startswith(b"\xff\xd8\xff") or not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return "cpu"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            ok = img.format == "JPEG" and img.mode in ("RGB", "L") and 0 < w * h <= max_pixels
    except Exception:  # any header the CPU decoder should judge
        return "cpu"
    return "gpu" if ok else "cpu"


def decode_image(data: bytes, size: int, max_pixels: int = MAX_PIXELS, resize: str = DEFAULT_RESIZE) -> np.ndarray:
    """Decode ``data`` to an RGB uint8 array [size, size, 3], fitted by ``resize``
    (:func:`fit_image`: squash | pad | center_crop; bilinear). Pass the encoder's
    ``spec.resize``; the default (``squash``) is that of encoders exported before resize modes."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {resize!r} (expected squash, pad or center_crop)")
    if not data:
        raise DecodeError("empty", "zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w <= 0 or h <= 0 or w * h > max_pixels:
                raise DecodeError("too_large", f"{w}x{h} pixels exceeds the limit of {max_pixels}")
            img.seek(0)  # animated formats: first frame
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            img.load()
            return np.asarray(fit_image(_to_rgb(img), size, resize), dtype=np.uint8)
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DecodeError("too_large", str(err)) from err
    except Image.UnidentifiedImageError as err:
        raise DecodeError("not_an_image", "bytes are not a known image format") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise DecodeError("corrupt", str(err) or type(err).__name__) from err
    except Exception as err:  # decoders of rare formats raise assorted types (EOFError, struct.error, ...)
        raise DecodeError("corrupt", f"{type(err).__name__}: {err}") from err


def to_tensor_batch(images: np.ndarray):
    """[B, S, S, 3] uint8 → torch [B, 3, S, S] float in [0, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)
