"""Image decoding and preprocessing, defined once for pretext training and extraction.

``decode_image`` turns file bytes into an RGB uint8 array of size S×S (the encoder's
input), whatever the file: JPEG (incl. CMYK), PNG (8/16-bit, palette with
transparency, greyscale, RGBA), GIF (first frame), WebP... Transparent pixels are
composited on white. Absurd dimensions are refused from the header, before any pixel
is decoded. Failures raise :class:`DecodeError` with a short reason.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile

MAX_PIXELS = 64_000_000  # refuse larger images from their header (decompression bombs)


class DecodeError(ValueError):
    """The bytes are not a decodable image; ``reason`` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), "L")
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
                rgb = rgb.resize((size, size), Image.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except DecodeError:
        raise
    except Image.DecompressionBombError as err:
        raise DecodeError("too_large", str(err)) from err
    except Image.UnidentifiedImageError as err:
        raise DecodeError("not_an_image", "bytes are not a known image format") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise DecodeError("corrupt", str(err) or type(err).__name__) from err


def to_tensor_batch(images: np.ndarray):
    """[B, S, S, 3] uint8 → torch [B, 3, S, S] float in [0, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)
