"""Pictures the viewer serves: cached thumbnails of the result images, and PNGs of maps and masks.

Thumbnails are made on first request and kept on disk under the user cache folder, keyed by the
image's real path, modification time and size (and the thumbnail size), so a changed image gets a new one.
Every picture is decoded and re-encoded: the bytes of a referenced file are never sent as they are.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from neuroloc.imageio import ImageError, load_image

THUMB_SIZES = (160, 320, 640, 1280)  # the only sizes served, so the cache cannot be filled with variants
CACHE_VERSION = "1"


def user_cache_dir() -> Path:
    """``$NEUROLOC_CACHE_DIR``, else the platform's user cache folder + ``neuroloc``."""
    if os.environ.get("NEUROLOC_CACHE_DIR"):
        return Path(os.environ["NEUROLOC_CACHE_DIR"])
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "neuroloc"


def open_picture(
    path: Path, draft_size: int | None = None, max_pixels: int | None = None, intensity: str = "range"
) -> Image.Image:
    """An image file as upright 8-bit RGB (:func:`neuroloc.imageio.load_image`); for a thumbnail,
    JPEG files are decoded at a reduced scale close to ``draft_size`` (much faster on large photos).

    Raises:
        ImageError: for a missing, non-image, truncated or oversized file.
    """
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    return load_image(path, max_pixels, draft_size, intensity)


class ThumbnailCache:
    """JPEG thumbnails on disk, made lazily; images of more than 8 bits per sample read as ``intensity`` says."""

    def __init__(self, folder: Path, intensity: str = "range") -> None:
        self.folder = folder / "thumbs"
        self.intensity = intensity

    def key(self, path: Path, size: int) -> str:
        real = os.path.realpath(path)
        stat = os.stat(real)
        text = f"{CACHE_VERSION}\0{real}\0{stat.st_mtime_ns}\0{stat.st_size}\0{size}"
        if self.intensity != "range":  # keys made before the option existed stay valid
            text += f"\0{self.intensity}"
        return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()

    def get(self, path: Path, size: int) -> Path:
        """The cached thumbnail of ``path`` no larger than ``size`` on either side, made if needed.

        Raises:
            ImageError: when the image cannot be read.
            ValueError: for a size not in THUMB_SIZES.
        """
        if size not in THUMB_SIZES:
            raise ValueError(f"size must be one of {', '.join(map(str, THUMB_SIZES))}")
        try:
            key = self.key(path, size)
        except OSError:
            raise ImageError(f"{path}: no such file") from None
        target = self.folder / key[:2] / f"{key}.jpg"
        if target.is_file():
            return target
        image = open_picture(path, draft_size=size, intensity=self.intensity)
        image.thumbnail((size, size), Image.Resampling.BILINEAR)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as f:
                image.save(f, "JPEG", quality=85)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=False, compress_level=3)
    return buffer.getvalue()


def _colormap(values: np.ndarray, name: str) -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps[name](np.clip(values, 0.0, 1.0)) * 255).astype(np.uint8)


def saliency_png(saliency: np.ndarray) -> bytes:
    """A guided-backprop map: red positive, blue negative, white zero (symmetric scale, saturating at
    the 99.5th percentile of |value| so that sparse maps stay visible)."""
    magnitude = np.abs(saliency)
    limit = float(np.percentile(magnitude, 99.5)) or float(magnitude.max()) or 1.0
    rgba = _colormap(saliency / (2 * limit) + 0.5, "seismic")
    return png_bytes(Image.fromarray(rgba[..., :3]))


def blob_png(blob: np.ndarray) -> bytes:
    return png_bytes(Image.fromarray(blob.astype(np.uint8) * 255))


def density_png(density: np.ndarray, alpha: float = 0.6) -> bytes:
    """The DAM vote map as a translucent jet overlay (transparent where there are no votes)."""
    top = float(density.max()) or 1.0
    values = np.clip(density / top, 0.0, 1.0)
    rgba = _colormap(values, "jet")
    rgba[..., 3] = (np.sqrt(values) * alpha * 255).astype(np.uint8)
    return png_bytes(Image.fromarray(rgba, "RGBA"))


def mask_png(mask: np.ndarray, colour: tuple[int, int, int] = (255, 200, 0), alpha: int = 120) -> bytes:
    """The union mask as a translucent overlay, at most 640 pixels on a side."""
    picture = Image.fromarray(mask.astype(np.uint8) * 255)
    picture.thumbnail((640, 640), Image.Resampling.NEAREST)
    inside = np.asarray(picture) > 127
    rgba = np.zeros((*inside.shape, 4), dtype=np.uint8)
    rgba[inside] = (*colour, alpha)
    return png_bytes(Image.fromarray(rgba, "RGBA"))
