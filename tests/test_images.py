"""Reading user images with medvl.imaging.read_image: PNG/JPEG, and DICOM rendered by a preprocessing
description, on the real sample files that pydicom and pydicom-data ship. Expected pixels are computed
here from the raw pixel data and the formulas the description names (rescale, window, percentile
stretch), not through medvl's code path."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medvl.errors import InputError
from medvl.imaging import Preprocessing, read_image


def window(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    """centre - width/2 -> 0, centre + width/2 -> 255, rounded to nearest."""
    return np.clip(np.rint((values - (centre - width / 2)) * 255.0 / width), 0, 255).astype(np.uint8)


def stretch(values: np.ndarray, reference: np.ndarray, lo: float = 0.5, hi: float = 99.5) -> np.ndarray:
    """The [lo, hi] percentiles of `reference` onto 0-255, rounded to nearest."""
    a, b = np.percentile(reference.astype(np.float32), [lo, hi])
    return np.floor(np.clip((values - a) / (b - a), 0, 1) * 255.0 + 0.5).astype(np.uint8)


def hu(ds) -> np.ndarray:
    return ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    """Equal but for values that fall on a rounding boundary (medvl windows in float32)."""
    assert got.shape == want.shape
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99


def test_png_and_jpeg_from_path_and_bytes(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    image.save(tmp_path / "a.png")
    image.convert("L").save(tmp_path / "b.jpg", quality=95)
    assert np.array_equal(np.asarray(read_image(tmp_path / "a.png")), np.asarray(image))
    from_bytes = read_image((tmp_path / "b.jpg").read_bytes())
    assert from_bytes.mode == "RGB" and from_bytes.size == (40, 30)


def test_16_bit_png_is_stretched_by_percentiles(tmp_path):
    """A 16-bit greyscale PNG has no display range of its own: the same percentile stretch as DICOM MR
    (PIL's own conversion would clip it to its low byte)."""
    values = np.random.default_rng(1).integers(0, 4096, (20, 30)).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "x.png")
    got = np.asarray(read_image(tmp_path / "x.png"))
    assert np.array_equal(got[..., 0], stretch(values.astype(np.float64), values))
    narrow = Preprocessing(percentiles=(5, 95))
    assert np.array_equal(
        np.asarray(read_image(tmp_path / "x.png", narrow))[..., 0],
        stretch(values.astype(np.float64), values, 5, 95),
    )


def test_ct_is_windowed_by_body_region():
    """CT_small names no body part: "auto" falls back to the abdomen (soft-tissue) window, 40/400; a
    default region, a named window or an explicit one change it; the file's own window is not used."""
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    assert ds.Modality == "CT" and "BodyPartExamined" not in ds
    got = np.asarray(read_image(path))
    assert got.shape == (ds.Rows, ds.Columns, 3)
    assert_close(got[..., 0], window(hu(ds), 40, 400))
    assert_close(
        np.asarray(read_image(path, Preprocessing(default_region="Chest")))[..., 0],
        window(hu(ds), -600, 1500),
    )
    assert_close(
        np.asarray(read_image(path, Preprocessing(ct_window="bone")))[..., 0], window(hu(ds), 400, 1800)
    )
    assert_close(
        np.asarray(read_image(path, Preprocessing(ct_window=(100, 50))))[..., 0], window(hu(ds), 100, 50)
    )


def test_ct_body_part_picks_the_window():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for part, (c, w) in {"HEAD": (40, 80), "THORAX": (-600, 1500), "LSPINE": (400, 1800)}.items():
        ds.BodyPartExamined = part
        buf = io.BytesIO()
        ds.save_as(buf)
        assert_close(np.asarray(read_image(buf.getvalue()))[..., 0], window(hu(ds), c, w))
    # A card maps a spelling DICOM does not define; the map travels in the description.
    ds.BodyPartExamined = "HEADNECK"
    buf = io.BytesIO()
    ds.save_as(buf)
    mapped = read_image(buf.getvalue(), Preprocessing(region_map={"HEADNECK": "Head"}))
    assert_close(np.asarray(mapped)[..., 0], window(hu(ds), 40, 80))


def test_mr_is_stretched_by_percentiles_not_by_its_window():
    path = get_testdata_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    assert "WindowCenter" in ds  # present, and deliberately not used: it differs between consoles
    values = hu(ds).astype(np.float64)
    got = np.asarray(read_image(path))[..., 0]
    assert np.array_equal(got, stretch(values, values))
    assert not np.array_equal(got, window(values, float(ds.WindowCenter), float(ds.WindowWidth)))


def test_multi_frame_middle_frame_on_the_whole_files_range():
    """emri_small: 10 MR frames. The middle one is shown, stretched by the percentiles of all the
    frames (scope "volume"), or of itself (scope "frame")."""
    path = get_testdata_file("emri_small.dcm")
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array.astype(np.float64)
    assert ds.NumberOfFrames == 10
    got = np.asarray(read_image(path))[..., 0]
    assert np.array_equal(got, stretch(frames[5], frames))
    per_frame = np.asarray(read_image(path, Preprocessing(percentile_scope="frame")))[..., 0]
    assert np.array_equal(per_frame, stretch(frames[5], frames[5]))
    assert not np.array_equal(got, per_frame)


def test_monochrome1_is_inverted_and_large_images_shrink_to_max_side():
    path = get_testdata_file("RG3_UNCR.dcm")  # a 1760 x 1760 computed radiograph from pydicom-data
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.Rows == 1760
    values = hu(ds).astype(np.float64)
    full = np.asarray(read_image(path, Preprocessing(max_side=2048)))[..., 0]
    assert np.array_equal(full, 255 - stretch(values, values))
    assert read_image(path).size == (1024, 1024)  # the default max_side


@pytest.mark.parametrize("name", ["US1_UNCR.dcm", "US1_J2KR.dcm"])
def test_rgb_ultrasound_keeps_its_colours(name):
    """Uncompressed and JPEG 2000 lossless copies of one ultrasound give the same pixels."""
    got = np.asarray(read_image(get_testdata_file(name)))
    assert np.array_equal(got, pydicom.dcmread(get_testdata_file("US1_UNCR.dcm")).pixel_array)
    assert (got[..., 0] != got[..., 1]).any()  # really colour


def test_palette_colour_goes_through_its_lut():
    from pydicom.pixels import apply_color_lut

    ds = pydicom.dcmread(get_testdata_file("examples_palette.dcm"))
    got = np.asarray(read_image(get_testdata_file("examples_palette.dcm")))
    rgb = apply_color_lut(ds.pixel_array, ds).astype(np.float64)  # 16-bit LUT entries
    assert got.shape[2] == 3 and (got[..., 0] != got[..., 2]).any()
    assert np.array_equal(got, np.floor(rgb / 65535 * 255 + 0.5).astype(np.uint8))


def test_limits_refuse_before_decoding(tmp_path):
    ct = get_testdata_file("CT_small.dcm")
    with pytest.raises(InputError, match="pixel limit"):
        read_image(ct, max_pixels=100)
    with pytest.raises(InputError, match="byte limit"):
        read_image(ct, max_bytes=1000)
    # a header claiming 65535 x 65535 pixels is refused at the default limit, without decoding
    ds = pydicom.dcmread(ct)
    ds.Rows = ds.Columns = 65535
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(InputError, match="65535x65535, above"):
        read_image(buf.getvalue())
    # a multi-frame file: its percentile range reads every frame of a short one; all the frames held
    # at once stay within 4 x max_pixels
    emri = get_testdata_file("emri_small.dcm")  # 10 frames of 64 x 64
    with pytest.raises(
        InputError, match=r"NumberOfFrames: .* 8 frames of 64x64, above the 32768-pixel limit"
    ):
        read_image(emri, max_pixels=64 * 64 * 2)
    assert read_image(emri, max_pixels=64 * 64 * 3).size == (64, 64)
    Image.new("L", (3000, 3000)).save(tmp_path / "bomb.png")  # 9 Mpx in a few kB
    with pytest.raises(InputError, match=r"bomb\.png: image: image is 3000x3000"):
        read_image(tmp_path / "bomb.png", max_pixels=1_000_000)


def test_bad_input_names_the_source(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match=r"notes\.txt: image: not a readable image"):
        read_image(tmp_path / "notes.txt")
    with pytest.raises(InputError, match="MR_truncated.dcm: PixelData: cannot decode"):
        read_image(get_testdata_file("MR_truncated.dcm"))
    Image.new("RGB", (4, 4)).save(tmp_path / "x.bmp")
    with pytest.raises(InputError, match="expected DICOM or PNG, JPEG"):
        read_image(tmp_path / "x.bmp", formats=("PNG", "JPEG"))
    no_pixels = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del no_pixels.PixelData
    buf = io.BytesIO()
    no_pixels.save_as(buf)
    with pytest.raises(InputError, match="scan: PixelData: no image"):
        read_image(buf.getvalue(), name="scan")


def _processed(images, size: int) -> np.ndarray:
    from medvl.model.build import square_image_processor

    return square_image_processor(size)(images, return_tensors="np")["pixel_values"]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_reading_at_the_model_size_gives_the_pixels_of_a_full_read(tmp_path, fmt):
    """A 1024 px scan read for a 64 px or 336 px model is reduced while read (JPEG at a smaller DCT
    scale, any format box-averaged), never below the model's size; what the image processor makes of
    it matches what it makes of the full-resolution image to within resampling differences."""
    yy, xx = np.mgrid[0:1024, 0:1024]
    # a smooth phantom with structure at several scales (a uniform image would hide differences)
    arr = 128 + 60 * np.sin(xx / 37.0) * np.cos(yy / 23.0) + 40 * ((xx - 500) ** 2 + (yy - 400) ** 2 < 150**2)
    path = tmp_path / f"scan.{fmt.lower()}"
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).convert("RGB").save(path, format=fmt, quality=95)
    full = read_image(path)
    assert full.size == (1024, 1024)
    # JPEG: DCT scale 1/8 for 64 px, 1/2 for 336 px; PNG: box-averaged 8x, or left alone when
    # halving would already go below 2 x 336
    expected = {"JPEG": {64: 128, 336: 512}, "PNG": {64: 128, 336: 1024}}[fmt]
    for size in (64, 336):
        small = read_image(path, size=size)
        assert small.size == (expected[size], expected[size])
        ours, reference = _processed([small], size), _processed([full], size)
        assert ours.shape == reference.shape
        # normalised pixel values span about 4 units; resampling differs by a small fraction of that
        assert np.abs(ours - reference).mean() < 0.005, np.abs(ours - reference).mean()
        assert np.abs(ours - reference).max() < 0.1


def test_reading_at_the_model_size_leaves_small_images_and_reduces_dicom():
    ct = get_testdata_file("CT_small.dcm")  # 128 x 128
    full = np.asarray(read_image(ct))
    assert np.array_equal(np.asarray(read_image(ct, size=40)), full)  # under 4x the size: untouched
    quarter = np.asarray(read_image(ct, size=16))  # kept at >= 2 x 16
    assert quarter.shape == (32, 32, 3)
    # a 4x4 box average of the windowed image (PIL rounds; allow one grey level)
    want = full.astype(np.float64).reshape(32, 4, 32, 4, 3).mean(axis=(1, 3))
    assert np.abs(quarter - want).max() <= 1
