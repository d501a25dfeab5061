"""Reading images safely, whatever their format, mode or size."""

from __future__ import annotations

import io
import logging
import stat
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Pillow's own default guard: it warns above this many pixels (a warning turned into an error here) and
# refuses twice as many; larger than any camera's picture.
MAX_PIXELS = 89_478_485
_TOO_LARGE = "raise the limit (--max-pixels N; in Python, Localizer(max_pixels=N)), or downscale the image first"
# FITS (astronomy) is read with astropy, which applies BZERO / BSCALE; Pillow's own reader ignores them.
FITS_SUFFIXES = (".fits", ".fit", ".fts")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".avif", ".ppm", ".pgm",
                  *FITS_SUFFIXES)
_FITS_MAGIC = b"SIMPLE  ="
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, either byte order
_ORIENTATION = 0x0112  # the EXIF / TIFF tag
# How images with more than 8 bits per sample (16-bit, 32-bit integer, float) become 8-bit: "range" maps the
# type's range (0-65535 for 16-bit; a float image's own minimum to maximum), "stretch" maps the image's own
# STRETCH_PERCENTILES to 0-255, as a microscope's or telescope's 12- or 14-bit data in a 16-bit file needs.
INTENSITIES = ("range", "stretch")
STRETCH_PERCENTILES = (0.5, 99.5)
# Read with "range", an image of more than 8 bits whose pixels, all but the brightest 0.5 %, stay in this lowest
# share of the range mapped to 0-255 comes out dark (a 12- or 14-bit sensor's data in a 16-bit file; a float
# image with a few hot pixels); such images get a notice pointing to "stretch".
DIM_SHARE = 0.25
_RANGE_USED = "neuroloc_range_used"
_SIGNED_16 = "neuroloc_signed_16"  # a picture's info key: its samples are signed 16-bit (Pillow reads them as 32-bit)


class ImageError(ValueError):
    """An input that is not a usable image; the message is one line meant for the user."""


class DimImageWarning(UserWarning):
    """An image of more than 8 bits per sample filled little of its type's range and came out dark
    (:func:`looks_dim`)."""


def load_image(
    path: str | Path, max_pixels: int | None = None, draft_size: int | None = None, intensity: str = "range"
) -> Image.Image:
    """Open ``path`` as an 8-bit RGB image, upright according to its EXIF orientation.

    Grayscale, 16-bit, float, CMYK, palette and alpha images are converted (alpha over white; more than
    8 bits per sample as ``intensity`` says, :data:`INTENSITIES`). With ``draft_size`` (for thumbnails),
    JPEG files are decoded at a reduced scale close to that size. ``max_pixels``: the largest image read,
    above Pillow's own limit too; None follows Pillow's limit, ``PIL.Image.MAX_IMAGE_PIXELS``
    (:data:`MAX_PIXELS` unless changed).
    Raises ImageError for missing, empty, truncated, non-image or oversized files.
    """
    path = Path(path)
    try:
        status = path.stat()
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file" + (" (a link to nothing)" if path.is_symlink() else "")) from None
    except (OSError, ValueError) as exc:  # no permission to a folder on the way, a name too long, a loop of links,
        # a NUL byte in the name (ValueError)
        raise ImageError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or first_line(exc)})") from None
    if stat.S_ISDIR(status.st_mode):
        raise ImageError(f"{path}: is a directory")
    if status.st_size == 0:
        raise ImageError(f"{path}: empty file")
    return _decode(path, str(path), max_pixels, draft_size, intensity)


def decode_image(data: bytes, name: str = "<bytes>", max_pixels: int | None = None, intensity: str = "range") -> Image.Image:
    """:func:`load_image` for the bytes of an image file (read elsewhere, e.g. by Ray Data); ``name`` is
    used in the error messages.
    """
    if not data:
        raise ImageError(f"{name}: empty file")
    return _decode(io.BytesIO(data), name, max_pixels, intensity=intensity)


def _decode(
    source: Path | io.BytesIO, name: str, max_pixels: int | None, draft_size: int | None = None, intensity: str = "range"
) -> Image.Image:
    check_intensity(intensity)  # the caller's mistake, not the image's
    if max_pixels is None:
        max_pixels = Image.MAX_IMAGE_PIXELS or sys.maxsize  # None there: Pillow's guard is off
    if _starts_with(source, _FITS_MAGIC):
        return to_rgb(_with_finite_samples(_read_fits(source, name, max_pixels), name), intensity)
    try:
        with _quiet_warnings():
            warnings.simplefilter("ignore")  # Pillow's notes on damaged EXIF and the like: the picture itself loads
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _pillow_guard_off():
                opened = Image.open(source)
            with opened:
                _check_size(name, *opened.size, max_pixels)
                if _colour_of_16_bits(opened):  # Pillow would keep only each sample's high byte
                    wide = _read_colour_of_16_bits(source, opened, name)
                    if wide is not None:
                        return wide_to_rgb(wide, name, intensity, opened.getexif().get(_ORIENTATION))
                if draft_size is not None and opened.format == "JPEG":
                    opened.draft("RGB", (draft_size, draft_size))
                opened.load()
                image = _black_is_zero(opened, _upright(opened))
                if _signed_16_bits(opened):
                    image.info[_SIGNED_16] = True
            return to_rgb(_with_finite_samples(image, name), intensity)
    except ImageError:
        raise
    except UnidentifiedImageError:
        if any(_starts_with(source, magic) for magic in _TIFF_MAGICS):  # float colour, float64 ...: beyond Pillow
            return _tiff_beyond_pillow(source, name, max_pixels, intensity)
        raise ImageError(f"{name}: not an image file (or a format Pillow cannot read)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name}: too many pixels for Pillow's decompression-bomb guard ({first_line(exc)}); {_TOO_LARGE}") from None
    except Exception as exc:  # noqa: BLE001 - a damaged file makes Pillow raise nearly any type (struct.error,
        # TypeError, IndexError ...); each is that image's error, which a batch records and goes on from
        raise ImageError(f"{name}: cannot decode image ({first_line(exc)})") from None


def _tiff_beyond_pillow(source: Path | io.BytesIO, name: str, max_pixels: int, intensity: str) -> Image.Image:
    """A TIFF that Pillow cannot open (float colour, float64 ...), read with tifffile; every failure an ImageError."""
    try:
        array, orientation = _read_tiff(source, name, max_pixels)
        return wide_to_rgb(array, name, intensity, orientation)
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - odd sample layouts fail in numpy or Pillow with many types
        raise ImageError(f"{name}: cannot decode TIFF ({first_line(exc)})") from None


def _upright(opened: Image.Image) -> Image.Image:
    """A loaded image turned upright by its EXIF orientation; as stored when that EXIF is too damaged to read
    (the picture itself is fine)."""
    try:
        return ImageOps.exif_transpose(opened)
    except Exception:  # noqa: BLE001 - Pillow's EXIF parser raises struct.error, TypeError, KeyError ... on bad tags
        return opened.copy()


def _black_is_zero(opened: Image.Image, image: Image.Image) -> Image.Image:
    """``image`` (``opened`` loaded and turned upright) with its samples inverted when it is a grey TIFF of more than
    8 bits stored white-is-zero (photometric interpretation 0): Pillow inverts such 8-bit and 1-bit files itself,
    but hands 16-bit and float ones over as stored, which would show them as a negative."""
    if opened.format != "TIFF" or image.mode not in ("I;16", "I;16B", "I;16L", "F") \
            or getattr(opened, "tag_v2", {}).get(262) != 0:
        return image
    return Image.fromarray(_white_is_zero_inverted(np.asarray(image, dtype=np.float32 if image.mode == "F" else np.uint16)))


def _white_is_zero_inverted(samples: np.ndarray) -> np.ndarray:
    """Grey samples stored white-is-zero, turned positive: an integer type's maximum and minimum swap places, floats
    change sign (their range mapped is their own minimum to maximum)."""
    if samples.dtype.kind == "f":
        return -samples
    limits = np.iinfo(samples.dtype)
    return (int(limits.max) + int(limits.min) - samples.astype(np.int64)).astype(samples.dtype)


def _signed_16_bits(opened: Image.Image) -> bool:
    """Whether ``opened`` is a TIFF of signed 16-bit samples (SampleFormat 2, 16 bits), which Pillow reads as 32-bit
    integers: only the file says so, not the values (a signed file may hold no negative sample)."""
    tags = getattr(opened, "tag_v2", None)
    if opened.format != "TIFF" or tags is None:
        return False

    def first(value: Any) -> Any:
        return value[0] if isinstance(value, tuple) and value else value

    return first(tags.get(339)) == 2 and first(tags.get(258)) == 16


def _colour_of_16_bits(opened: ImageFile.ImageFile) -> bool:
    """Whether Pillow decodes this opened image's 16-bit colour samples to 8 bits, keeping their high byte (a
    16-bit RGB(A) PNG or TIFF), which would lose a 12-bit sensor's data and leave ``stretch`` nothing to stretch."""
    if opened.mode not in ("RGB", "RGBA") or not opened.tile:
        return False
    if opened.format == "TIFF":  # by its header: Pillow reads 16-bit samples stored plane by plane as 8-bit ones
        bits = getattr(opened, "tag_v2", {}).get(258, 8)
        return max(bits if isinstance(bits, tuple) else (bits,)) > 8
    args = opened.tile[0][3]  # the raw mode: a string, or the first of a tuple
    rawmode = args[0] if isinstance(args, tuple) and args else args
    return isinstance(rawmode, str) and ";16" in rawmode


def _read_colour_of_16_bits(source: Path | io.BytesIO, opened: Image.Image, name: str) -> np.ndarray | None:
    """All 16 bits of a colour PNG or TIFF, as (H, W, 3 or 4) in RGB(A) order: TIFF with tifffile, PNG with OpenCV
    when it is installed. None where neither can (a PNG without OpenCV, a TIFF compression tifffile lacks the codec
    for): Pillow's high bytes are read then, which is what ``range`` makes of full-range 16-bit data anyway."""
    if opened.format == "TIFF":
        try:
            return _read_tiff(source, name, sys.maxsize)[0]
        except ImageError:
            return None
    if opened.format != "PNG":
        return None
    try:
        import cv2
    except ImportError:
        return None
    data = source.getvalue() if isinstance(source, io.BytesIO) else source.read_bytes()
    array = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None or array.ndim != 3 or array.shape[2] not in (3, 4):
        return None
    return array[..., [2, 1, 0, 3][: array.shape[2]]]  # OpenCV's BGR(A)


def _read_tiff(source: Path | io.BytesIO, name: str, max_pixels: int) -> tuple[np.ndarray, int | None]:
    """The first page of a TIFF file with tifffile, as (H, W) or (H, W, samples), and its orientation tag: the
    sample types Pillow does not read (float colour, float64, 16-bit colour at full depth)."""
    import tifffile

    if isinstance(source, io.BytesIO):
        source.seek(0)
    log = logging.getLogger("tifffile")
    level = log.level
    log.setLevel(logging.CRITICAL)  # its notes on damaged files: the one-line error says enough
    try:
        with tifffile.TiffFile(source) as tiff:
            page = tiff.pages[0]
            axes = page.axes
            width, height, orientation = _page_geometry(page)
            _check_size(name, width, height, max_pixels)
            array = np.asarray(page.asarray())
            white_is_zero = page.photometric == 0
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - broken files and codecs it lacks raise many types (ModuleNotFoundError ...)
        raise ImageError(f"{name}: cannot decode TIFF ({first_line(exc)})") from None
    finally:
        log.setLevel(level)
    if axes.startswith("S"):  # samples stored plane after plane
        array, axes = np.moveaxis(array, 0, -1), axes[1:] + "S"
    if axes not in ("YX", "YXS") or (array.ndim == 3 and array.shape[2] > 4):
        raise ImageError(f"{name}: a TIFF of shape {page.shape} ({page.axes}); neuroloc reads grey, grey with alpha, "
                         "RGB and RGBA pictures")
    if white_is_zero and array.ndim == 2 and array.dtype.kind in "iuf":  # as _black_is_zero does for Pillow's files
        array = _white_is_zero_inverted(array)
    return array, orientation


def _page_geometry(page: Any) -> tuple[int, int, int | None]:
    """A tifffile page's stored (width, height) and its orientation tag (None without one), from its header."""
    tag = page.tags.get(_ORIENTATION)
    return page.shape[page.axes.index("X")], page.shape[page.axes.index("Y")], tag.value if tag is not None else None


def wide_to_rgb(array: np.ndarray, name: str, intensity: str, orientation: int | None = None) -> Image.Image:
    """A decoded (H, W) or (H, W, 1-4) array of any sample type as 8-bit RGB (:func:`array_to_rgb`), turned upright
    by its EXIF / TIFF ``orientation``."""
    kind = array.dtype.kind
    if kind not in "biuf":
        raise ImageError(f"{name}: samples of type {array.dtype}, not a picture's numbers")
    if kind == "b":
        array = array.astype(np.uint8) * 255
    elif kind == "f" and not np.isfinite(array).any():
        raise ImageError(f"{name}: no finite pixel value (every sample is NaN or infinite)")
    if array.ndim == 3 and array.shape[2] <= 2:  # grey, and grey with alpha
        grey = array[..., 0]
        array = grey if array.shape[2] == 1 else np.dstack([grey, grey, grey, array[..., 1]])
    if array.ndim == 2 and kind in "iu" and array.dtype.itemsize > 1 and array.dtype not in (np.uint16, np.int16):
        fits = np.iinfo(np.int32).min <= array.min() and array.max() <= np.iinfo(np.int32).max
        array = array.astype(np.int32 if fits else np.float64)  # Pillow's mode I; else as floats, not wrapped round
    if array.ndim == 2 and array.dtype.kind == "f":  # as Pillow reads a grey float file (mode F): its own range
        picture = to_rgb(Image.fromarray(array.astype(np.float32)), intensity)
    else:
        picture = array_to_rgb(array, intensity)
    if orientation not in (None, 1):
        used = range_used(picture)
        picture.getexif()[_ORIENTATION] = orientation
        picture = ImageOps.exif_transpose(picture)
        if used is not None:
            picture.info[_RANGE_USED] = used
    return picture


def _with_finite_samples(image: Image.Image, name: str) -> Image.Image:
    """``image``, unless it is a float image without one finite sample (a blank result, all NaN): that would
    come out black and get a box as if it were a picture."""
    if image.mode == "F" and not np.isfinite(np.asarray(image)).any():
        raise ImageError(f"{name}: no finite pixel value (every sample is NaN or infinite)")
    return image


def _check_size(name: str, width: int, height: int, max_pixels: int) -> None:
    """ImageError when a ``width`` x ``height`` picture is over ``max_pixels``: read from the header, before the
    pixels are."""
    if width * height > max_pixels:
        raise ImageError(f"{name}: {width}x{height} pixels is over the limit of {max_pixels:,}; {_TOO_LARGE}")


_PILLOW_LIMIT = threading.Lock()
_WARNING_FILTERS = threading.RLock()


@contextmanager
def _quiet_warnings() -> Iterator[None]:
    """``warnings.catch_warnings()``, one thread at a time. Before Python 3.14 the filters are the process's:
    two threads' blocks interleaving would restore each other's filters and leave every later warning ignored,
    so decoding in several threads takes turns here."""
    with _WARNING_FILTERS, warnings.catch_warnings():
        yield


@contextmanager
def _pillow_guard_off() -> Iterator[None]:
    """Pillow's decompression-bomb check off while a header is read: :func:`_decode` checks the size itself
    right after, before any pixel is decoded, against the limit in force, and says which limit that is.

    Pillow has no per-call limit, only the module's ``MAX_IMAGE_PIXELS``, which ``Image.open`` checks (warning
    above it, refusing above twice it, so its message would quote twice the limit given); it is restored at once.
    """
    with _PILLOW_LIMIT:
        earlier = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = earlier


# EXIF orientations that turn the picture by a quarter: its upright width is the stored height.
_QUARTER_TURNS = (5, 6, 7, 8)


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image once turned upright by its EXIF orientation, as :func:`load_image`
    gives it, read from the header alone."""
    width, height = image.size
    return (height, width) if image.getexif().get(0x0112) in _QUARTER_TURNS else (width, height)


def file_is_turned(path: str | Path) -> bool:
    """Whether an image file's EXIF orientation turns or mirrors its stored pixels (:func:`load_image` applies it);
    False for a file without one, or that Pillow cannot open."""
    try:
        with _pillow_guard_off():
            image = Image.open(path)
        with image:
            return image.getexif().get(0x0112, 1) not in (0, 1)
    except Exception:  # noqa: BLE001 - a damaged header raises many types; such a file has no orientation to tell
        return False


def file_upright_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) of an image file once turned upright, as :func:`load_image` gives it, from its header alone
    (TIFFs Pillow cannot open through tifffile); None for a file that is not a readable image."""
    try:
        with _pillow_guard_off():  # the header alone: an image over the pixel limit still has a size
            image = Image.open(path)
        with image:
            return upright_size(image)
    except UnidentifiedImageError:
        if not any(_starts_with(Path(path), magic) for magic in _TIFF_MAGICS):
            return None
    except Exception:  # noqa: BLE001 - a damaged header raises many types; the file is then left out
        return None
    import tifffile

    try:
        with tifffile.TiffFile(path) as tiff:
            width, height, orientation = _page_geometry(tiff.pages[0])
    except Exception:  # noqa: BLE001 - as above: the file is then left out, as an unreadable one is
        return None
    return (height, width) if orientation in _QUARTER_TURNS else (width, height)


def _starts_with(source: Path | io.BytesIO, magic: bytes) -> bool:
    if isinstance(source, io.BytesIO):
        return source.getvalue()[: len(magic)] == magic
    try:
        with open(source, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


def _read_fits(source: Path | io.BytesIO, name: str, max_pixels: int) -> Image.Image:
    """The first image of a FITS file, scaled by its BZERO / BSCALE (astropy), as a 16-bit or float picture with
    the file's first row at the bottom, as FITS viewers (ds9) and Pillow show it. Of a cube, the first plane."""
    try:
        from astropy import log as astropy_log
        from astropy.io import fits
    except ImportError:
        raise ImageError(f"{name}: a FITS file; reading it needs astropy (pip install astropy)") from None
    level = astropy_log.level
    astropy_log.setLevel("ERROR")  # astropy's notes on broken files: the one-line error says enough
    try:
        with _quiet_warnings():
            warnings.simplefilter("ignore")
            with fits.open(source, memmap=False) as hdus:
                image = next((h for h in hdus if h.is_image and h.shape and len(h.shape) >= 2 and all(h.shape)), None)
                if image is None:
                    raise ImageError(f"{name}: a FITS file without an image")
                height, width = image.shape[-2:]
                _check_size(name, width, height, max_pixels)
                data = np.asarray(image.data)
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - astropy raises many types for a damaged header (KeyError for a bad BITPIX)
        detail = first_line(exc) if isinstance(exc, (OSError, ValueError)) else f"{type(exc).__name__}: {first_line(exc)}"
        raise ImageError(f"{name}: cannot decode FITS ({detail})") from None
    finally:
        astropy_log.setLevel(level)
    plane = np.flipud(data.reshape(-1, height, width)[0])
    if plane.dtype.kind == "u" and plane.dtype.itemsize <= 2:  # 8 or 16 bits: Pillow's L or I;16, in native order
        return Image.fromarray(np.ascontiguousarray(plane, dtype=np.uint8 if plane.dtype.itemsize == 1 else np.uint16))
    return Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32))  # signed, 32-bit and float data: mode F


def check_intensity(intensity: str) -> str:
    """``intensity`` itself when it is one of :data:`INTENSITIES`; else ValueError."""
    if intensity not in INTENSITIES:
        raise ValueError(f"unknown intensity {intensity!r}; choose from {', '.join(INTENSITIES)}")
    return intensity


def to_rgb(image: Image.Image, intensity: str = "range") -> Image.Image:
    """Any Pillow mode to a new 8-bit RGB image; more than 8 bits per sample as ``intensity`` says
    (:data:`INTENSITIES`). Non-finite float samples become black."""
    check_intensity(intensity)
    used: float | None = None
    key = image.info.get("transparency")  # a colour-key transparency (PNG's tRNS): that value is see-through
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        samples = np.asarray(image, dtype=np.float64)
        pixels, used = _eight_bit(samples, image.mode == "F", image.mode.startswith("I;16"), intensity,
                                  signed=bool(image.info.get(_SIGNED_16)))
        image = Image.fromarray(pixels)
        if isinstance(key, int):
            image = Image.fromarray(np.dstack([pixels, np.where(samples == key, 0, 255).astype(np.uint8)]))  # LA
    if image.mode == "P" or (key is not None and image.mode in ("L", "RGB")):
        image = image.convert("RGBA")
    if image.mode in ("La", "RGBa"):  # premultiplied alpha (a TIFF's associated alpha)
        image = image.convert(image.mode[:-1] + "A")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    else:
        rgb = image.convert("RGB")
    if used is not None:
        rgb.info[_RANGE_USED] = used
    return rgb


def _eight_bit(
    array: np.ndarray, floating: bool, sixteen_bit: bool, intensity: str, signed: bool = False
) -> tuple[np.ndarray, float | None]:
    """Samples of more than 8 bits (all channels alike) as uint8, and the share of the mapped range they use
    (read with ``range``; None otherwise). ``signed``: signed 16-bit samples, mapped from -32768 to 32767."""
    finite = np.isfinite(array)
    values = array[finite] if not finite.all() else array
    used: float | None = None
    if values.size == 0:
        low, high = 0.0, 1.0
    elif intensity == "stretch":
        low, high = (float(v) for v in np.percentile(values, STRETCH_PERCENTILES))
    else:
        if floating:
            low, high = float(values.min()), float(values.max())
        else:
            top = float(values.max())  # 32-bit integers beyond 16 bits: up to their own maximum
            low, high = 0.0, top if top > 65535 else 65535.0 if sixteen_bit or top > 255 else 255.0
            if signed:
                low, high = -32768.0, 32767.0
        wide = floating or high > 255  # 8-bit values in a wider integer type are left alone
        if wide and high > low:
            used = (float(np.percentile(values, STRETCH_PERCENTILES[1])) - low) / (high - low)
    scaled = (np.where(finite, array, low) - low) / max(high - low, 1e-12) * 255.0
    rounding = 0.0 if floating and intensity == "range" else 0.5  # as before the option existed
    return np.clip(scaled + rounding, 0, 255).astype(np.uint8), used


def array_to_rgb(array: np.ndarray, intensity: str = "range") -> Image.Image:
    """A numpy picture as a new 8-bit RGB image: (H, W), (H, W, 3) or (H, W, 4) of uint8, of wider integers
    (uint16 ...) or of floats; whatever else ``Image.fromarray`` takes. Floats all within [0, 1] (matplotlib's
    and scikit-image's convention) are taken as 0 to 1 (with ``intensity="stretch"``, stretched as other
    data); other samples of more than 8 bits as ``intensity`` says, one scale for the three channels, so that
    colours keep their balance. A grey array gives the picture its three equal channels would. A fourth
    channel is alpha, over white.

    Raises:
        TypeError: for an array of another shape or type.
    """
    check_intensity(intensity)
    if array.ndim not in (2, 3) or min(array.shape[:2], default=0) < 1:
        raise TypeError(f"cannot take an array of shape {array.shape} as a picture; give (H, W) of numbers, or "
                        "(H, W, 3) or (H, W, 4) colour")
    if array.ndim == 2 and array.dtype != np.uint8 and array.dtype.kind in "iuf":
        array = np.repeat(array[..., None], 3, axis=2)
    wide_colour = array.ndim == 3 and array.shape[2] in (3, 4) and array.dtype != np.uint8 \
        and (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating))
    if not wide_colour:
        try:
            return to_rgb(Image.fromarray(array), intensity)
        except TypeError as exc:
            raise TypeError(f"cannot take an array of shape {array.shape} and type {array.dtype} as a picture "
                            f"({exc}); give (H, W) of numbers, or (H, W, 3) or (H, W, 4) colour") from None
    floating = bool(np.issubdtype(array.dtype, np.floating))
    colour = np.asarray(array[..., :3], dtype=np.float64)
    finite = colour[np.isfinite(colour)]
    used: float | None
    if floating and intensity == "range" and finite.size and finite.min() >= 0 and finite.max() <= 1:
        pixels = np.clip(np.where(np.isfinite(colour), colour, 0.0) * 255 + 0.5, 0, 255).astype(np.uint8)  # as to_rgb
        used = float(np.percentile(finite, STRETCH_PERCENTILES[1]))  # of the range 0 to 1: a dim picture is told
    else:
        pixels, used = _eight_bit(colour, floating, array.dtype.itemsize == 2, intensity, signed=array.dtype == np.int16)
    picture = Image.fromarray(pixels)
    if array.shape[2] == 4:
        alpha = np.asarray(array[..., 3], dtype=np.float64)
        # the colour's scale: 0-1 floats, 8-bit values in a wider integer type, else 16-bit
        top = 1.0 if floating else 255.0 if alpha.max() <= 255 else 65535.0
        opacity = np.clip(np.nan_to_num(alpha, nan=top) / top * 255 + 0.5, 0, 255).astype(np.uint8)
        picture = to_rgb(Image.fromarray(np.dstack([pixels, opacity])), intensity)
    if used is not None:
        picture.info[_RANGE_USED] = used
    return picture


def range_used(image: Image.Image) -> float | None:
    """For a picture from :func:`to_rgb` (or the loaders) of an image of more than 8 bits read with ``range``:
    the share of the mapped range under which 99.5 % of its pixels lie. None for any other picture."""
    return image.info.get(_RANGE_USED)


def looks_dim(image: Image.Image) -> bool:
    """Whether ``image`` came from data of more than 8 bits that ``range`` left dark (:data:`DIM_SHARE`), where
    ``stretch`` would map its own range instead."""
    used = range_used(image)
    return used is not None and used < DIM_SHARE


@dataclass
class DarkImages:
    """The pictures of a run that came out dark (:func:`looks_dim`): how many, and the first as an example."""

    count: int = 0
    example: tuple[str, float] | None = None  # its name and :func:`range_used`

    def note(self, name: str | Path, picture: Image.Image) -> None:
        self.note_range(name, range_used(picture))

    def note_range(self, name: str | Path, used: float | None) -> None:
        """Count an image by its :func:`range_used` alone (e.g. as reported by a worker process)."""
        if used is not None and used < DIM_SHARE:
            self.count += 1
            self.example = self.example or (str(name), used)

    def notice(self) -> str | None:
        """The one-line notice (:func:`dim_notice`), or None when no picture came out dark."""
        return None if self.example is None else dim_notice(self.count, *self.example)


def dim_notice(count: int, example: str, used: float, remedy: str = "--intensity stretch") -> str:
    """The one-line notice for ``count`` dark-looking images (:func:`looks_dim`); ``example`` one of them, with
    its :func:`range_used`."""
    fix = f"{remedy} maps each image's own range instead"
    if count == 1:
        return (f"{example}: more than 8 bits per sample, and 99.5% of its pixels lie in the lowest {used:.1%} of "
                f"the range mapped to 0-255, so it came out dark; {fix}")
    return (f"{count} images of more than 8 bits per sample have 99.5% of their pixels in the lowest "
            f"{DIM_SHARE:.0%} of the range mapped to 0-255 and came out dark (e.g. {example}: in the lowest {used:.1%}); "
            f"{fix}")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
