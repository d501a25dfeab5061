"""Awkward image files for the image-reading and command-line tests, written into a temporary folder.

Odd-but-valid files are made from a real photo when the shared data set is present (so the classifier
sees a real object), else from a synthetic picture; broken files are broken the same way in both cases.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

FULLRES_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "ilsvrc2012_val_fullres" / "images"
EXIF_ORIENTATION = 0x0112

# Files that must load, and files that must be refused with an ImageError.
GOOD_CASES = ("gray_L.png", "deep_I16.png", "cmyk.jpg", "palette_P.png", "alpha_RGBA.png", "alpha_LA.png",
              "exif_rotated.jpg")
BAD_CASES = ("text_as.jpg", "empty.jpg", "truncated.jpg", "bomb.png")
# Size of the upright picture the good cases are made from (width, height); the EXIF file stores it turned.
SIZE = (320, 240)


def real_images(count: int) -> list[Path]:
    """The first ``count`` shared full-resolution JPEGs (empty when the data set is absent)."""
    if not FULLRES_IMAGES.is_dir():
        return []
    return sorted(FULLRES_IMAGES.glob("*.JPEG"))[:count]


def base_picture() -> Image.Image:
    """An RGB picture of SIZE: a real photo, or a synthetic one."""
    found = real_images(1)
    if found:
        with Image.open(found[0]) as photo:
            return photo.convert("RGB").resize(SIZE, Image.Resampling.BILINEAR)
    yy, xx = np.mgrid[0 : SIZE[1], 0 : SIZE[0]]
    rgb = np.stack([xx * 255 // SIZE[0], yy * 255 // SIZE[1], (xx + yy) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def write_good_cases(folder: Path) -> dict[str, Path]:
    """Write every odd-but-valid file; returns name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = base_picture()
    paths = {name: folder / name for name in GOOD_CASES}
    rgb.convert("L").save(paths["gray_L.png"])
    deep = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(deep).save(paths["deep_I16.png"])  # mode I;16
    rgb.convert("CMYK").save(paths["cmyk.jpg"], quality=90)
    rgb.convert("P", palette=Image.ADAPTIVE, colors=64).save(paths["palette_P.png"])
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(SIZE))
    rgba.save(paths["alpha_RGBA.png"])
    rgba.convert("LA").save(paths["alpha_LA.png"])
    write_exif_rotated(rgb, paths["exif_rotated.jpg"])
    return paths


def write_exif_rotated(upright: Image.Image, path: Path) -> None:
    """Store ``upright`` turned on its side with EXIF orientation 6, as a camera held upright would.

    Orientation 6 means "rotate 90 degrees clockwise to display", so the stored pixels are the upright
    picture turned 90 degrees counter-clockwise: a W x H picture is stored as H x W.
    """
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    stored.save(path, exif=exif, quality=90)


def write_bad_cases(folder: Path) -> dict[str, Path]:
    """Write every broken file; returns name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / name for name in BAD_CASES}
    paths["text_as.jpg"].write_text("this is a text file, not a JPEG\n", encoding="utf-8")
    paths["empty.jpg"].write_bytes(b"")
    whole = _jpeg_bytes()
    paths["truncated.jpg"].write_bytes(whole[: len(whole) // 2])
    # 400 million 1-bit pixels compress to ~50 kB: a small file that would need gigabytes to decode.
    Image.new("1", (20000, 20000)).save(paths["bomb.png"])
    return paths


def _jpeg_bytes() -> bytes:
    found = real_images(1)
    if found:
        return found[0].read_bytes()
    import io

    buffer = io.BytesIO()
    base_picture().save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()
