"""Reading images safely, whatever their format, mode or size."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow's own default guard: it warns above this many pixels (a warning turned into an error here) and
# refuses twice as many; larger than any camera's picture.
MAX_PIXELS = 89_478_485
_TOO_LARGE = "downscale or tile the image first"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class ImageError(ValueError):
    """An input that is not a usable image; the message is one line meant for the user."""


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Open ``path`` as an 8-bit RGB image, upright according to its EXIF orientation.

    Grayscale, 16-bit, CMYK, palette and alpha images are converted (alpha over white). With
    ``draft_size`` (for thumbnails), JPEG files are decoded at a reduced scale close to that size.
    Raises ImageError for missing, empty, truncated, non-image or oversized files.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a directory")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file")
    return _decode(path, str(path), max_pixels, draft_size)


def decode_image(data: bytes, name: str = "<bytes>", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """:func:`load_image` for the bytes of an image file (read elsewhere, e.g. by Ray Data); ``name`` is
    used in the error messages.
    """
    if not data:
        raise ImageError(f"{name}: empty file")
    return _decode(io.BytesIO(data), name, max_pixels)


def _decode(source: Path | io.BytesIO, name: str, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as opened:
                width, height = opened.size
                if width * height > max_pixels:
                    raise ImageError(f"{name}: {width}x{height} pixels is over the limit of {max_pixels:,}; {_TOO_LARGE}")
                if draft_size is not None and opened.format == "JPEG":
                    opened.draft("RGB", (draft_size, draft_size))
                opened.load()
                image = ImageOps.exif_transpose(opened)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file (or a format Pillow cannot read)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name}: too many pixels for Pillow's decompression-bomb guard ({_first_line(exc)}); {_TOO_LARGE}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: cannot decode image ({_first_line(exc)})") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        span = max(float(array.max() - array.min()), 1e-12)
        image = Image.fromarray(((array - array.min()) / span * 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
