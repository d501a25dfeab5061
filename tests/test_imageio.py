"""load_image: every mode becomes upright 8-bit RGB; every broken file is one clear ImageError."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from image_cases import BAD_CASES, GOOD_CASES, SIZE, base_picture, real_images, write_bad_cases, write_good_cases
from neuroloc.imageio import ImageError, array_to_rgb, dim_notice, load_image, looks_dim, range_used, to_rgb, wide_to_rgb


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_good_cases(tmp_path_factory.mktemp("good"))


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_bad_cases(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("name", GOOD_CASES)
def test_odd_files_load_as_upright_rgb(good: dict[str, Path], name: str) -> None:
    image = load_image(good[name])
    assert image.mode == "RGB"
    assert image.size == SIZE  # the EXIF-rotated file too: it is stored as 240x320
    assert np.asarray(image).std() > 1  # not a blank picture


def test_exif_rotation_is_applied(good: dict[str, Path]) -> None:
    with Image.open(good["exif_rotated.jpg"]) as stored:
        assert stored.size == (SIZE[1], SIZE[0])
    loaded = np.asarray(load_image(good["exif_rotated.jpg"]), dtype=np.float32)
    upright = np.asarray(base_picture(), dtype=np.float32)
    # The same picture up to JPEG noise, and far from the picture turned upside down.
    error = np.abs(loaded - upright).mean()
    assert error < 10
    assert np.abs(loaded - upright[::-1, ::-1]).mean() > 3 * error


def test_sixteen_bit_uses_the_full_range(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16)).save(path)
    assert np.asarray(load_image(path))[0, :, 0].tolist() == [0, 128, 255]


def test_stretch_gives_twelve_bit_data_in_a_sixteen_bit_file_its_contrast(tmp_path: Path) -> None:
    ramp = np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)  # a 12-bit camera's values
    path = tmp_path / "camera.png"
    Image.fromarray(ramp).save(path)
    ranged = np.asarray(load_image(path))[..., 0]
    stretched = np.asarray(load_image(path, intensity="stretch"))[..., 0]
    assert ranged.max() == 16  # 4095 / 65535 of the 8-bit range: nearly black
    assert stretched.min() == 0 and stretched.max() == 255
    assert np.isclose(np.median(stretched), 127.5, atol=2)


def test_high_bit_data_that_fills_little_of_its_range_is_flagged_as_dim(tmp_path: Path) -> None:
    """Read with "range", 12-bit data in a 16-bit file, or a float image with one hot pixel, come out dark; the
    picture says so, so that the commands can point to "stretch". Full-range, stretched and 8-bit pictures are
    not flagged."""
    ramp = np.linspace(0, 4095, 256).reshape(16, 16).astype(np.uint16)
    twelve = tmp_path / "twelve.png"
    Image.fromarray(ramp).save(twelve)
    picture = load_image(twelve)
    assert looks_dim(picture) and range_used(picture) == pytest.approx(np.percentile(ramp, 99.5) / 65535)
    assert not looks_dim(load_image(twelve, intensity="stretch")) and range_used(load_image(twelve, intensity="stretch")) is None
    bright = Image.fromarray(np.linspace(0, 65535, 256).reshape(16, 16).astype(np.uint16))
    assert range_used(to_rgb(bright)) == pytest.approx(0.995) and not looks_dim(to_rgb(bright))
    hot = np.random.default_rng(0).normal(100.0, 1.0, (16, 16)).astype(np.float32)
    hot[3, 4] = 1e5  # one hot pixel: everything else lands near 0 of the image's own min..max
    assert looks_dim(to_rgb(Image.fromarray(hot)))
    assert not looks_dim(to_rgb(Image.fromarray(np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16))))
    eight_in_thirty_two = Image.fromarray(np.array([[0, 40]], dtype=np.int32))  # mode "I", 8-bit values
    assert range_used(to_rgb(eight_in_thirty_two)) is None
    assert range_used(to_rgb(Image.fromarray(np.full((4, 4, 3), 3, dtype=np.uint8)))) is None
    assert range_used(to_rgb(Image.fromarray(np.full((4, 4), 2.0, dtype=np.float32)))) is None  # flat: no range


def test_the_dim_notice_names_an_example_and_the_remedy() -> None:
    one = dim_notice(1, "scan.tif", 0.0625)
    assert one.startswith("scan.tif:") and "6.2%" in one and "--intensity stretch" in one and "\n" not in one
    many = dim_notice(3, "scan.tif", 0.0625, remedy='Localizer(intensity="stretch")')
    assert many.startswith("3 images") and "(e.g. scan.tif: in the lowest 6.2%)" in many and 'Localizer(intensity="stretch")' in many


def test_stretch_leaves_eight_bit_images_alone() -> None:
    picture = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3) + 100)
    assert np.array_equal(np.asarray(to_rgb(picture, "stretch")), np.asarray(picture))
    grey = Image.fromarray(np.full((4, 4), 7, dtype=np.uint8))
    assert np.asarray(to_rgb(grey, "stretch")).max() == 7


def test_float_images_with_non_finite_values_and_flat_images() -> None:
    values = np.array([[np.nan, 1.0, 2.0], [3.0, np.inf, 5.0]], dtype=np.float32)
    for intensity in ("range", "stretch"):
        out = np.asarray(to_rgb(Image.fromarray(values), intensity))[..., 0]
        assert out[0, 0] == 0 and out[1, 1] == 0  # black
        assert out[0, 1] < out[1, 0] < out[1, 2] and out[1, 2] >= 250
    assert np.asarray(to_rgb(Image.fromarray(np.full((3, 3), np.nan, dtype=np.float32)))).max() == 0
    assert np.asarray(to_rgb(Image.fromarray(np.full((3, 3), 500, dtype=np.uint16)), "stretch")).max() == 0


def test_a_float_file_without_one_finite_sample_is_an_image_error(tmp_path: Path) -> None:
    blank = tmp_path / "blank.tif"
    Image.fromarray(np.full((16, 16), np.nan, dtype=np.float32)).save(blank)
    with pytest.raises(ImageError, match="blank.tif: no finite pixel value"):
        load_image(blank)
    partly = tmp_path / "partly.tif"
    Image.fromarray(np.where(np.eye(16) > 0, 1.0, np.nan).astype(np.float32)).save(partly)
    assert load_image(partly).size == (16, 16)


def _twelve_bit_colour() -> np.ndarray:
    """A 12-bit camera's colour picture in 16-bit samples: a ramp per channel, so contrast and order show."""
    ramp = np.linspace(0, 4095, 24 * 32).reshape(24, 32)
    return np.dstack([ramp, ramp[::-1], np.full_like(ramp, 2048)]).astype(np.uint16)


def test_sixteen_bit_colour_tiffs_keep_every_bit(tmp_path: Path) -> None:
    """Pillow keeps only the high byte of 16-bit colour samples (and garbles those stored plane by plane);
    tifffile reads them whole, so stretch has data to stretch and the dim notice sees the range used."""
    tifffile = pytest.importorskip("tifffile")
    colour = _twelve_bit_colour()
    expected = array_to_rgb(colour, "stretch")
    for name, kwargs, data in (("interleaved.tif", {}, colour), ("planar.tif", {"planarconfig": "separate"}, colour),
                               ("alpha.tif", {"extrasamples": [2]}, np.dstack([colour, np.full(colour.shape[:2], 65535, np.uint16)])),
                               ("deflate.tif", {"compression": "zlib"}, colour)):
        path = tmp_path / name
        tifffile.imwrite(path, np.moveaxis(data, -1, 0) if "planarconfig" in kwargs else data, photometric="rgb", **kwargs)
        stretched = load_image(path, intensity="stretch")
        assert np.array_equal(np.asarray(stretched), np.asarray(expected)), name
        assert looks_dim(load_image(path)), name
    turned = tmp_path / "turned.tif"  # orientation 6: the stored picture turned a quarter clockwise to be upright
    tifffile.imwrite(turned, colour, photometric="rgb", extratags=[(0x0112, 3, 1, 6, True)])
    upright = load_image(turned, intensity="stretch")
    assert np.array_equal(np.asarray(upright), np.asarray(expected.transpose(Image.Transpose.ROTATE_270)))


def test_float_and_float64_tiffs_pillow_cannot_open_are_read(tmp_path: Path) -> None:
    tifffile = pytest.importorskip("tifffile")
    rgb = np.random.default_rng(1).integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "colour.tif", (rgb / 255).astype(np.float32), photometric="rgb")
    assert np.array_equal(np.asarray(load_image(tmp_path / "colour.tif")), rgb)  # floats in [0, 1], as arrays
    tifffile.imwrite(tmp_path / "grey64.tif", rgb[..., 0].astype(np.float64) * 1000)
    grey = np.asarray(load_image(tmp_path / "grey64.tif"))
    assert grey.shape == (12, 10, 3) and grey.min() == 0 and grey.max() == 255
    tifffile.imwrite(tmp_path / "blank.tif", np.full((4, 4, 3), np.nan, np.float32), photometric="rgb")
    with pytest.raises(ImageError, match="blank.tif: no finite pixel value"):
        load_image(tmp_path / "blank.tif")
    (tmp_path / "cut.tif").write_bytes((tmp_path / "colour.tif").read_bytes()[:200])
    with pytest.raises(ImageError, match=r"^\S*cut.tif: cannot decode TIFF \(.+\)$"):
        load_image(tmp_path / "cut.tif")
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((6, 4, 5), np.float32), photometric="rgb", extrasamples=[0, 0])
    with pytest.raises(ImageError, match=r"stack.tif: a TIFF of shape \(6, 4, 5\) \(YXS\)"):
        load_image(tmp_path / "stack.tif")


def test_tiffs_of_any_sample_type_are_a_picture_or_one_image_error(tmp_path: Path) -> None:
    tifffile = pytest.importorskip("tifffile")
    ramp = np.linspace(0, 1, 12 * 10).reshape(12, 10)
    tifffile.imwrite(tmp_path / "half.tif", ramp.astype(np.float16))
    tifffile.imwrite(tmp_path / "huge.tif", (ramp * 2**34).astype(np.uint64))  # beyond int32: not wrapped round
    for name in ("half.tif", "huge.tif"):
        grey = np.asarray(load_image(tmp_path / name))[..., 0]
        assert grey.min() == 0 and grey.max() == 255 and (np.diff(grey.astype(int), axis=1) >= 0).all(), name
    mask = np.asarray(wide_to_rgb(np.dstack([ramp > 0.5] * 3), "mask", "range"))
    assert np.array_equal(mask[..., 0], np.where(ramp > 0.5, 255, 0))
    tifffile.imwrite(tmp_path / "complex.tif", ramp.astype(np.complex64))
    with pytest.raises(ImageError, match=r"complex.tif: samples of type complex64, not a picture's numbers"):
        load_image(tmp_path / "complex.tif")
    with pytest.raises(ValueError, match="unknown intensity") as raised:  # the caller's mistake, before any image
        load_image(tmp_path / "half.tif", intensity="bogus")
    assert not isinstance(raised.value, ImageError)


def test_the_upright_size_of_a_tiff_pillow_cannot_open_is_read_from_its_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tifffile = pytest.importorskip("tifffile")
    from neuroloc.imageio import file_upright_size

    tifffile.imwrite(tmp_path / "turned.tif", np.zeros((12, 10, 3), np.float32), photometric="rgb",
                     extratags=[(0x0112, 3, 1, 6, True)])
    assert file_upright_size(tmp_path / "turned.tif") == (12, 10) == load_image(tmp_path / "turned.tif").size
    (tmp_path / "text.tif").write_text("not a picture")
    assert file_upright_size(tmp_path / "text.tif") is None
    Image.new("L", (3, 2)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2)  # over twice the limit: Image.open itself would refuse it
    assert file_upright_size(tmp_path / "big.png") == (3, 2)


def test_sixteen_bit_colour_pngs_are_read_whole_with_opencv_else_by_their_high_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cv2 = pytest.importorskip("cv2")
    colour = _twelve_bit_colour()
    path = tmp_path / "camera.png"
    cv2.imwrite(str(path), colour[..., ::-1])  # OpenCV writes BGR
    assert np.array_equal(np.asarray(load_image(path, intensity="stretch")), np.asarray(array_to_rgb(colour, "stretch")))
    assert looks_dim(load_image(path))
    monkeypatch.setitem(__import__("sys").modules, "cv2", None)  # OpenCV not installed: Pillow's high bytes
    high_bytes = np.asarray(load_image(path))
    assert np.array_equal(high_bytes, (colour >> 8).astype(np.uint8))


def test_premultiplied_alpha_is_read(tmp_path: Path) -> None:
    tifffile = pytest.importorskip("tifffile")
    grey = np.full((8, 10), 100, np.uint8)
    tifffile.imwrite(tmp_path / "La.tif", np.dstack([grey, np.full_like(grey, 255)]), photometric="minisblack",
                     extrasamples=[1])  # associated alpha: Pillow's mode La
    assert np.asarray(load_image(tmp_path / "La.tif")).tolist() == np.full((8, 10, 3), 100).tolist()


def test_damaged_exif_leaves_the_picture_as_stored(good: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import struct

    from PIL import ImageOps

    def broken(_image: Image.Image) -> Image.Image:
        raise struct.error("required argument is not an integer")  # what a fuzzed EXIF tag made Pillow raise

    monkeypatch.setattr(ImageOps, "exif_transpose", broken)
    assert load_image(good["exif_rotated.jpg"]).size == (SIZE[1], SIZE[0])  # not turned, but read


def test_any_error_while_decoding_is_the_image_s_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.png"
    Image.new("RGB", (4, 4)).save(path)

    def broken(_self: Image.Image) -> None:
        raise TypeError("'float' object cannot be interpreted as an integer")  # a byte-mutated TIFF's

    monkeypatch.setattr(Image.Image, "load", broken)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", broken)
    with pytest.raises(ImageError, match=r"a.png: cannot decode image \('float' object cannot be interpreted"):
        load_image(path)


def test_files_that_cannot_be_looked_up_are_image_errors(tmp_path: Path) -> None:
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    with pytest.raises(ImageError, match=r"dangling.jpg: no such file \(a link to nothing\)"):
        load_image(tmp_path / "dangling.jpg")
    with pytest.raises(ImageError, match=r"cannot read \(File name too long\)"):
        load_image(tmp_path / ("y" * 300 + ".png"))
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    with pytest.raises(ImageError, match=r"loop.jpg: cannot read \(Too many levels of symbolic links\)"):
        load_image(tmp_path / "loop.jpg")


def test_thirty_two_bit_integers_beyond_sixteen_bits_are_not_saturated() -> None:
    values = np.array([[0, 1_000_000, 4_000_000]], dtype=np.int32)
    assert np.asarray(to_rgb(Image.fromarray(values)))[0, :, 0].tolist() == [0, 64, 255]


def test_colour_arrays_of_more_than_eight_bits_become_the_same_picture() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    opaque = np.full((6, 5, 1), 1.0)
    for array in (rgb, rgb / 255, (rgb / 255).astype(np.float32), rgb.astype(np.uint16) * 257,
                  np.dstack([rgb / 255, opaque]), np.dstack([rgb.astype(np.uint16) * 257, np.full((6, 5), 65535, dtype=np.uint16)])):
        picture = array_to_rgb(array)
        assert picture.mode == "RGB" and np.array_equal(np.asarray(picture), rgb), array.dtype
    scaled = array_to_rgb(rgb * 4.0)  # floats beyond [0, 1]: the image's own range, one scale for all channels
    expected = (rgb * 4.0 - rgb.min() * 4.0) / (rgb.max() * 4.0 - rgb.min() * 4.0) * 255
    assert np.abs(np.asarray(scaled).astype(float) - expected).max() <= 1
    twelve_bit = array_to_rgb(rgb.astype(np.uint16) * 16)  # a 12-bit camera's colour in 16-bit samples
    assert looks_dim(twelve_bit) and not looks_dim(array_to_rgb(rgb.astype(np.uint16) * 16, "stretch"))
    rgba = np.dstack([rgb, np.full((6, 5), 255, dtype=np.uint8)])
    assert np.array_equal(np.asarray(array_to_rgb(rgba.astype(np.int64))), rgb)  # 8-bit values, alpha too
    clear = array_to_rgb(np.dstack([rgb / 255, np.zeros((6, 5))]))  # transparent: white
    assert np.asarray(clear).min() == 255
    with pytest.raises(TypeError, match=r"shape \(4, 4, 5\).*give \(H, W\) of numbers, or \(H, W, 3\)"):
        array_to_rgb(np.zeros((4, 4, 5)))


def test_grey_arrays_give_the_picture_of_their_three_equal_channels() -> None:
    """The README's rule (floats within [0, 1] are 0 to 1) holds for (H, W) too, of every numeric type."""
    ramp = np.linspace(0.2, 0.6, 20).reshape(4, 5)
    for grey in (ramp, ramp.astype(np.float32), ramp.astype(np.float16), (ramp * 1000).astype(np.int64),
                 (ramp * 1000).astype(np.uint16), np.full((4, 5), 0.5, np.float32)):
        picture = np.asarray(array_to_rgb(grey))
        assert np.array_equal(picture, np.asarray(array_to_rgb(np.dstack([grey] * 3)))), grey.dtype
    assert np.asarray(array_to_rgb(np.full((4, 5), 0.5, np.float32))).max() == 128  # not stretched to black
    odd = np.array([[0.5, np.inf], [np.nan, -np.inf]], np.float32)
    assert np.asarray(array_to_rgb(odd))[..., 0].tolist() == [[128, 0], [0, 0]]  # non-finite is black, as in files
    dark = np.random.default_rng(1).random((6, 5, 3)) / 16  # 12-bit data as floats in [0, 1]
    assert looks_dim(array_to_rgb(dark))  # told, as dark 16-bit data is
    stretched = np.asarray(array_to_rgb(dark, "stretch"))
    assert stretched.max() == 255 and not looks_dim(array_to_rgb(dark, "stretch"))


def test_unknown_intensity_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown intensity 'loud'"):
        to_rgb(Image.new("RGB", (2, 2)), "loud")


def test_transparency_is_laid_over_white() -> None:
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(to_rgb(clear)).min() == 255
    assert np.asarray(to_rgb(Image.new("LA", (4, 4), (0, 255)))).max() == 0


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("text_as.jpg", "not an image file"),
        ("empty.jpg", "empty file"),
        ("truncated.jpg", "cannot decode image"),
        ("bomb.png", "pixels is over the limit of 89,478,485"),
    ],
)
def test_broken_files_raise_one_line_errors(bad: dict[str, Path], name: str, reason: str) -> None:
    assert set(BAD_CASES) == set(bad)
    with pytest.raises(ImageError) as caught:
        load_image(bad[name])
    message = str(caught.value)
    assert reason in message and name in message
    assert "\n" not in message
    if name == "bomb.png":
        assert "raise the limit (--max-pixels N; in Python, Localizer(max_pixels=N))" in message  # what to do


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nothing.jpg")
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)


def test_pixel_limit_is_checked_before_decoding(good: dict[str, Path]) -> None:
    with pytest.raises(ImageError, match="over the limit of 1,000; raise the limit"):
        load_image(good["gray_L.png"], max_pixels=1000)


def test_real_photo_keeps_its_size() -> None:
    found = real_images(1)
    if not found:
        pytest.skip(f"shared images not found at {Path(__file__).resolve().parents[2] / 'shared'}")
    with Image.open(found[0]) as raw:
        expected = raw.size
    image = load_image(found[0])
    assert image.mode == "RGB" and image.size == expected


def _write_fits(path: Path, hdus: list) -> Path:
    from astropy.io import fits

    fits.HDUList(hdus).writeto(path)
    return path


def test_fits_is_read_with_its_scaling_and_the_first_row_at_the_bottom(tmp_path: Path) -> None:
    """A camera's unsigned 16-bit FITS stores signed values with BZERO 32768 (which Pillow's reader ignores);
    the rows are shown as FITS viewers show them, the file's first row at the bottom."""
    fits = pytest.importorskip("astropy.io.fits")
    counts = np.full((60, 80), 1000, dtype=np.uint16)
    counts[10:20, 30:40] = 3000  # rows 10-19 of the file
    path = _write_fits(tmp_path / "camera.fits", [fits.PrimaryHDU(counts)])
    assert fits.getheader(path)["BZERO"] == 32768
    ranged = load_image(path)
    assert ranged.size == (80, 60) and looks_dim(ranged)  # 3000 of 65535
    stretched = np.asarray(load_image(path, intensity="stretch"))[..., 0]
    rows, cols = np.nonzero(stretched > 200)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (40, 49, 30, 39)
    assert stretched[0, 0] == 0


def test_fits_images_in_extensions_floats_with_blanks_and_cubes(tmp_path: Path) -> None:
    fits = pytest.importorskip("astropy.io.fits")
    sky = np.linspace(-1.0, 1.0, 48 * 64, dtype=np.float32).reshape(48, 64)
    sky[5, 5] = np.nan  # a blank pixel
    path = _write_fits(tmp_path / "ext.fits", [fits.PrimaryHDU(), fits.ImageHDU(sky)])
    picture = np.asarray(load_image(path))[..., 0]
    assert picture.shape == (48, 64) and picture[47 - 5, 5] == 0 and picture[0, -1] == 255  # last row on top
    cube = np.stack([np.zeros((8, 8), np.float32), np.ones((8, 8), np.float32)])
    cube[0, 0, 0] = 1.0
    first = np.asarray(load_image(_write_fits(tmp_path / "cube.fits", [fits.PrimaryHDU(cube)])))[..., 0]
    assert first.shape == (8, 8) and first[7, 0] == 255 and first.sum() == 255  # the first plane
    with pytest.raises(ImageError, match="without an image"):
        load_image(_write_fits(tmp_path / "table.fits", [fits.PrimaryHDU()]))
    truncated = tmp_path / "cut.fits"
    truncated.write_bytes(_write_fits(tmp_path / "whole.fits", [fits.PrimaryHDU(sky)]).read_bytes()[:4000])
    with pytest.raises(ImageError, match="cut.fits: cannot decode FITS"):
        load_image(truncated)


def test_a_fits_header_astropy_cannot_parse_is_that_images_error(tmp_path: Path) -> None:
    fits = pytest.importorskip("astropy.io.fits")
    data = _write_fits(tmp_path / "ok.fits", [fits.PrimaryHDU(np.ones((8, 8), np.int16))]).read_bytes()
    card = next(data[i : i + 80] for i in range(0, 2880, 80) if data[i : i + 80].startswith(b"BITPIX"))
    broken = tmp_path / "bitpix.fits"  # BITPIX 17: astropy raises KeyError, which once escaped as a traceback
    broken.write_bytes(data.replace(card, card.replace(b"16", b"17", 1)))
    with pytest.raises(ImageError, match=r"bitpix.fits: cannot decode FITS \(KeyError: 17\)"):
        load_image(broken)


def test_a_name_with_a_nul_byte_is_that_images_error() -> None:
    with pytest.raises(ImageError, match="cannot read \\(embedded null byte\\)"):
        load_image("bad\0name.jpg")


def test_grey_tiffs_stored_white_is_zero_are_not_shown_as_negatives(tmp_path: Path) -> None:
    tifffile = pytest.importorskip("tifffile")
    stored = np.zeros((16, 16), np.uint16)
    stored[:, 8:] = 60000
    tifffile.imwrite(tmp_path / "w8.tif", (stored // 257).astype(np.uint8), photometric="miniswhite")
    tifffile.imwrite(tmp_path / "w16.tif", stored, photometric="miniswhite")
    tifffile.imwrite(tmp_path / "wf.tif", (stored / 65535).astype(np.float32), photometric="miniswhite")
    tifffile.imwrite(tmp_path / "b16.tif", stored, photometric="minisblack")
    pictures = {name: np.asarray(load_image(tmp_path / f"{name}.tif"))[0, [0, -1], 0] for name in ("w8", "w16", "wf", "b16")}
    assert pictures["w8"].tolist() == [255, 22]  # Pillow inverts 8-bit files itself
    assert pictures["w16"].tolist() == [255, 22]  # the same picture from 16 bits
    assert pictures["wf"].tolist() == [255, 0]  # floats: their own minimum to maximum
    assert pictures["b16"].tolist() == [0, 233]  # black-is-zero stays as stored
    wide = np.zeros((16, 16), np.uint32)  # a type Pillow cannot open: read by tifffile, turned positive there too
    wide[:, 8:] = 4_000_000_000
    tifffile.imwrite(tmp_path / "w32.tif", wide, photometric="miniswhite")
    assert np.asarray(load_image(tmp_path / "w32.tif"))[0, [0, -1], 0].tolist() == [255, 0]


def test_signed_16_bit_samples_map_their_signed_range(tmp_path: Path) -> None:
    tifffile = pytest.importorskip("tifffile")
    ramp = np.tile(np.arange(256, dtype=np.int32), (4, 1))
    tifffile.imwrite(tmp_path / "signed.tif", (ramp * 257 - 32768).astype(np.int16))
    picture = np.asarray(load_image(tmp_path / "signed.tif"))[0, :, 0]
    assert picture[0] == 0 and picture[-1] == 255 and np.all(np.diff(picture.astype(int)) >= 0)  # negatives not black
    assert np.abs(picture.astype(int) - np.arange(256)).max() <= 1
    # the file's type decides, not its values: a signed file without a negative sample maps the same way
    small = np.tile(np.linspace(0, 2000, 64).astype(np.int16), (4, 1))
    noisy = small.copy()
    noisy[0, 0] = -1
    tifffile.imwrite(tmp_path / "small.tif", small)
    tifffile.imwrite(tmp_path / "noisy.tif", noisy)
    row = np.asarray(load_image(tmp_path / "small.tif"))[1, :, 0]
    assert row[0] == 128 and np.array_equal(row, np.asarray(load_image(tmp_path / "noisy.tif"))[1, :, 0])
    assert np.array_equal(np.asarray(array_to_rgb(small))[1, :, 0], row)  # an int16 array alike
    # other integers with a negative sample keep their range (here 0-255): not flattened to mid-grey
    shifted = np.tile(np.arange(256, dtype=np.int32), (4, 1)) - 5
    for picture in (array_to_rgb(shifted), to_rgb(Image.fromarray(shifted))):
        assert np.asarray(picture)[0, [0, 5, 255], 0].tolist() == [0, 0, 250]


@pytest.mark.parametrize("mode", ["RGB", "L", "I;16"])
def test_colour_key_transparency_is_white_like_alpha(tmp_path: Path, mode: str) -> None:
    grey = np.full((8, 8), 200, np.uint8)
    grey[:2, :2] = 0  # the see-through colour
    arrays = {"RGB": np.dstack([grey] * 3), "L": grey, "I;16": grey.astype(np.uint16) * 257}
    key = {"RGB": (0, 0, 0), "L": 0, "I;16": 0}[mode]
    Image.fromarray(arrays[mode]).save(tmp_path / "keyed.png", transparency=key)
    picture = np.asarray(load_image(tmp_path / "keyed.png"))
    assert picture[0, 0].tolist() == [255, 255, 255] and picture[5, 5].tolist() == [200, 200, 200]


def test_fits_without_astropy_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    path = tmp_path / "sky.fits"
    path.write_bytes(b"SIMPLE  =                    T".ljust(2880, b" "))
    monkeypatch.setitem(sys.modules, "astropy", None)
    with pytest.raises(ImageError, match="sky.fits: a FITS file; reading it needs astropy"):
        load_image(path)


def test_the_pixel_limit_follows_pillow_s_unless_given(good: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    path = good["gray_L.png"]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageError, match="--max-pixels"):
        load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # Pillow's guard off: no limit but one given
    assert load_image(path).size == SIZE
    with pytest.raises(ImageError, match="over the limit of 100"):
        load_image(path, max_pixels=100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert load_image(path, max_pixels=10**6).size == SIZE  # a larger limit given wins over Pillow's
    assert Image.MAX_IMAGE_PIXELS == 100  # ... for that read only


def test_a_folder_yields_jfif_and_avif_photos_too(tmp_path: Path) -> None:
    from PIL import features

    from neuroloc.sources import find_images

    picture = Image.new("RGB", (32, 24), (200, 40, 40))
    picture.save(tmp_path / "camera.jfif", "JPEG")
    names = ["camera.jfif"]
    if features.check("avif"):
        picture.save(tmp_path / "phone.avif")
        names.append("phone.avif")
    found = find_images([str(tmp_path)])
    assert [p.name for p in found] == names
    for path in found:
        assert load_image(path).size == (32, 24)


def test_decoding_in_several_threads_leaves_the_warning_filters_as_they_were(tmp_path: Path) -> None:
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    paths = []
    for i in range(4):
        paths.append(tmp_path / f"p{i}.jpg")
        Image.new("RGB", (600, 400), (i * 40, 90, 200)).save(paths[-1])
    before = list(warnings.filters)
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(10):
            assert [im.size for im in pool.map(load_image, paths * 5)] == [(600, 400)] * 20
    assert warnings.filters == before
