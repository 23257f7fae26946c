"""Reading user images: PNG/JPEG, and DICOM windowed as a viewer would, on the real sample files that
pydicom and pydicom-data ship. Expected pixels are computed here from the raw pixel data and the
standard's formulas, independently of medvl's code path."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medvl.data.images import load_image


def window(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    lo = centre - width / 2
    return np.clip((values - lo) / width * 255.0, 0, 255).astype(np.uint8)


def hu(ds) -> np.ndarray:
    return ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))


def test_png_and_jpeg_from_path_and_bytes(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    image.save(tmp_path / "a.png")
    image.convert("L").save(tmp_path / "b.jpg", quality=95)
    assert np.array_equal(np.asarray(load_image(tmp_path / "a.png")), np.asarray(image))
    from_bytes = load_image((tmp_path / "b.jpg").read_bytes())
    assert from_bytes.mode == "RGB" and from_bytes.size == (40, 30)


def test_ct_without_window_gets_soft_tissue_window():
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    assert "WindowCenter" not in ds and ds.Modality == "CT"
    got = np.asarray(load_image(path))
    assert got.shape == (ds.Rows, ds.Columns, 3)
    assert np.array_equal(got[..., 0], window(hu(ds), 40, 400))


def test_mr_uses_the_files_window():
    path = get_testdata_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    got = np.asarray(load_image(path))[..., 0]
    assert np.array_equal(got, window(hu(ds), float(ds.WindowCenter), float(ds.WindowWidth)))


def test_first_window_of_several_and_mr_without_window_is_percentile_stretched():
    path = get_testdata_file("MR-SIEMENS-DICOM-WithOverlays.dcm")
    ds = pydicom.dcmread(path)
    assert len(ds.WindowCenter) > 1
    got = np.asarray(load_image(path))[..., 0]
    assert np.array_equal(got, window(hu(ds), float(ds.WindowCenter[0]), float(ds.WindowWidth[0])))
    # multi-frame MR without a window: the middle frame, 1st-99th percentile onto 0-255
    path = get_testdata_file("emri_small.dcm")
    ds = pydicom.dcmread(path)
    assert ds.NumberOfFrames == 10 and "WindowCenter" not in ds
    frame = ds.pixel_array[5].astype(np.float64)
    lo, hi = np.percentile(frame, [1, 99])
    want = np.clip((frame - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)
    assert np.array_equal(np.asarray(load_image(path))[..., 0], want)


def test_monochrome1_is_inverted():
    path = get_testdata_file("RG3_UNCR.dcm")  # a computed radiograph from pydicom-data
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    got = np.asarray(load_image(path))[..., 0]
    assert np.array_equal(got, 255 - window(hu(ds), float(ds.WindowCenter), float(ds.WindowWidth)))


@pytest.mark.parametrize("name", ["US1_UNCR.dcm", "US1_J2KR.dcm"])
def test_rgb_ultrasound_keeps_its_colours(name):
    """Uncompressed and JPEG 2000 lossless copies of one ultrasound give the same pixels."""
    got = np.asarray(load_image(get_testdata_file(name)))
    assert np.array_equal(got, pydicom.dcmread(get_testdata_file("US1_UNCR.dcm")).pixel_array)
    assert (got[..., 0] != got[..., 1]).any()  # really colour


def test_palette_colour_ultrasound():
    got = np.asarray(load_image(get_testdata_file("examples_palette.dcm")))
    assert got.shape[2] == 3 and (got[..., 0] != got[..., 2]).any()


def test_limits_refuse_before_decoding(tmp_path):
    ct = get_testdata_file("CT_small.dcm")
    with pytest.raises(ValueError, match="pixel limit"):
        load_image(ct, max_pixels=100)
    with pytest.raises(ValueError, match="byte limit"):
        load_image(ct, max_bytes=1000)
    # a header claiming 65535 x 65535 pixels is refused at the default limit, without decoding
    ds = pydicom.dcmread(ct)
    ds.Rows = ds.Columns = 65535
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(ValueError, match="65535x65535, above"):
        load_image(buf.getvalue())
    Image.new("L", (3000, 3000)).save(tmp_path / "bomb.png")  # 9 Mpx in a few kB
    with pytest.raises(ValueError, match=r"bomb\.png: image is 3000x3000"):
        load_image(tmp_path / "bomb.png", max_pixels=1_000_000)


def test_bad_input_names_the_source(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"notes\.txt: not a readable image"):
        load_image(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="MR_truncated.dcm: cannot decode DICOM pixel data"):
        load_image(get_testdata_file("MR_truncated.dcm"))
    Image.new("RGB", (4, 4)).save(tmp_path / "x.bmp")
    with pytest.raises(ValueError, match="expected DICOM or PNG, JPEG"):
        load_image(tmp_path / "x.bmp", formats=("PNG", "JPEG"))
    no_pixels = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del no_pixels.PixelData, no_pixels.Rows
    buf = io.BytesIO()
    no_pixels.save_as(buf)
    with pytest.raises(ValueError, match="has no image"):
        load_image(buf.getvalue())


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
    full = load_image(path)
    assert full.size == (1024, 1024)
    # JPEG: DCT scale 1/8 for 64 px, 1/2 for 336 px; PNG: box-averaged 8x, or left alone when
    # halving would already go below 2 x 336
    expected = {"JPEG": {64: 128, 336: 512}, "PNG": {64: 128, 336: 1024}}[fmt]
    for size in (64, 336):
        small = load_image(path, size=size)
        assert small.size == (expected[size], expected[size])
        ours, reference = _processed([small], size), _processed([full], size)
        assert ours.shape == reference.shape
        # normalised pixel values span about 4 units; resampling differs by a small fraction of that
        assert np.abs(ours - reference).mean() < 0.005, np.abs(ours - reference).mean()
        assert np.abs(ours - reference).max() < 0.1


def test_reading_at_the_model_size_leaves_small_images_and_reduces_dicom():
    ct = get_testdata_file("CT_small.dcm")  # 128 x 128
    full = np.asarray(load_image(ct))
    assert np.array_equal(np.asarray(load_image(ct, size=40)), full)  # under 4x the size: untouched
    quarter = np.asarray(load_image(ct, size=16))  # kept at >= 2 x 16
    assert quarter.shape == (32, 32, 3)
    # a 4x4 box average of the windowed image (PIL rounds; allow one grey level)
    want = full.astype(np.float64).reshape(32, 4, 32, 4, 3).mean(axis=(1, 3))
    assert np.abs(quarter - want).max() <= 1
