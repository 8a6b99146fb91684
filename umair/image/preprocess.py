"""Image decoding and preprocessing, defined once for pretext training and extraction.

``decode_image`` turns file bytes into an RGB uint8 array of size S×S (the encoder's
input), whatever the file: JPEG (incl. CMYK), PNG (8/16-bit, palette with
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
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile

from umair.errors import UmairError

MAX_PIXELS = 64_000_000  # refuse larger images from their header (decompression bombs)

# What decode_image (and umair.image.encoder.encode's uint8 → float step) does to every
# image; recorded in encoder manifests and hashed into the encoder version, so a change
# here gives new versions. decode_image takes its resampling filter from "interpolation".
PREPROCESSING: dict[str, str] = {
    "interpolation": "bilinear",
    "scale": "0..1",  # x / 255, no mean/std normalisation
    "mode": "RGB",
    "transparency": "composited on white",
    "deep_samples": "scaled to 8 bits by bit depth",
    "frames": "first",
}
_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST, "lanczos": Image.LANCZOS}


def preprocessing_manifest(size: int) -> dict:
    """The manifest's ``preprocessing`` entry for an encoder whose images are size × size."""
    return {"resize": [size, size], **PREPROCESSING}


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


def decode_image(data: bytes, size: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode ``data`` to an RGB uint8 array [size, size, 3] (resized, bilinear)."""
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
            rgb = _to_rgb(img)
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), _RESAMPLE[PREPROCESSING["interpolation"]])
            return np.asarray(rgb, dtype=np.uint8)
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
