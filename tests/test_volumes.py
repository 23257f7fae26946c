"""Volumes kept whole by curation (`options.volume`, medvl.imaging.VolumeSpec): real volumes shipped in
packages (nibabel's test data, pydicom's CT series and CT_small.dcm) and in shared data (the spleen CT, the
spine MRI), checked against values read independently with nibabel / pydicom and plain NumPy; the spec
round-trips and its `apply` gives what curation stored; bad volumes and series are quarantined with the
reason; a killed volume curation resumes to a clean run's files."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from conftest import SHARED_DATA, kill_9_after_commits
from pydantic import ValidationError

from medvl.curate.card import load_card
from medvl.curate.pipeline import curate
from medvl.errors import InputError
from medvl.imaging import VolumeSpec, label_boxes, read_dicom_series, read_volume

REPO = Path(__file__).resolve().parents[1]
CARDS = REPO / "configs" / "cards"
NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
PYDICOM_DATA = Path(pydicom.__file__).parent / "data" / "test_files"
SPLEEN = SHARED_DATA / "spleen_ct" / "ct_scan"
SPLEEN_CT = SPLEEN / "sub-spleen2" / "ct" / "sub-spleen2_ct.nii.gz"
SPLEEN_SEG = SPLEEN / "derivatives" / "labels" / "sub-spleen2" / "ct" / "sub-spleen2_ct_seg-manual.nii.gz"
SPINE = SHARED_DATA / "spine_mri"
needs_spleen = pytest.mark.skipif(not SPLEEN_CT.is_file(), reason="shared data absent")
needs_spine = pytest.mark.skipif(not SPINE.is_dir(), reason="shared data absent")


# ---------------------------------------------------------------- independent readings


def nib_lps(path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """A NIfTI file's values as a [S, P, L] array (reoriented with nibabel alone), its affine and its
    orientation code."""
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float64)  # scl_slope / scl_inter applied by nibabel
    now = nib.orientations.io_orientation(img.affine)
    lps = nib.orientations.apply_orientation(
        data, nib.orientations.ornt_transform(now, nib.orientations.axcodes2ornt(("L", "P", "S")))
    )
    return lps.transpose(2, 1, 0), img.affine, "".join(nib.aff2axcodes(img.affine))


def by_hand_window(hu: np.ndarray, centre: float, width: float) -> np.ndarray:
    return np.clip(np.rint((hu - (centre - width / 2)) * 255 / width), 0, 255)


def by_hand_percentile(x: np.ndarray, lo: float = 0.5, hi: float = 99.5) -> np.ndarray:
    """Percentile range of every (n // 16)-th axial slice onto 0-255, rounded half up."""
    a, b = np.percentile(x[:: max(1, len(x) // 16)].astype(np.float32), (lo, hi))
    return np.floor(np.clip((x - a) / (b - a), 0, 1) * 255 + 0.5)


def same_grid_spec(lps: np.ndarray, spacing_xyz, **kw) -> VolumeSpec:
    """A spec that keeps the file's grid (no resampling, crop or padding): what it stores can be compared
    voxel for voxel with the file."""
    return VolumeSpec(spacing=[float(s) for s in spacing_xyz][::-1], size=list(lps.shape), **kw)


def hand_box(mask: np.ndarray) -> tuple[list[int], list[int]]:
    idx = np.nonzero(mask)
    return [int(i.min()) for i in idx], [int(i.max()) + 1 for i in idx]


def volume_rows(out: Path) -> list[dict]:
    rows = pq.read_table(sorted((out / "data").glob("*.parquet"))).to_pylist()
    return [r for r in rows if r["kind"] == "volume"]


def quarantined(out: Path) -> dict[str, dict]:
    return {e["file"]: e for e in map(json.loads, (out / "quarantine.jsonl").read_text().splitlines())}


def assert_counts_add_up(report: dict, out: Path) -> None:
    c = report["counts"]
    assert c["read"] == c["kept"] + c["quarantined"] + sum(c["dropped"].values())
    assert c["kept"] == pq.ParquetDataset(sorted((out / "data").glob("*.parquet"))).read().num_rows
    assert c["quarantined"] == len((out / "quarantine.jsonl").read_text().splitlines())


def assert_stored_volumes(out: Path) -> list[dict]:
    """Every volume record's array is there, loads without pickle, and is what its record says; no other
    file is in volumes/."""
    rows = volume_rows(out)
    files = set()
    for r in rows:
        v = json.loads(r["volume"])
        a = np.load(out / v["file"], allow_pickle=False)
        assert a.dtype == np.uint8 and list(a.shape) == v["shape"] and len(v["channels"]) == a.shape[0]
        spec = VolumeSpec.model_validate_json(r["volume_spec"])
        assert tuple(a.shape[1:]) == spec.size and v["spacing_mm"] == list(spec.spacing)
        assert (r["width"], r["height"], r["image"], r["id"]) == (
            a.shape[3],
            a.shape[2],
            None,
            f"{r['source']}/{r['file']}#volume",
        )
        files.add(v["file"])
    assert {p.relative_to(out).as_posix() for p in (out / "volumes").glob("*")} == files
    return rows


# ---------------------------------------------------------------- the spec


def test_spec_round_trips_and_refuses_what_it_cannot_do():
    spec = VolumeSpec(
        spacing=[3, 1.5, 1.5], size=[64, 128, 128], windows=["abdomen", [400, 1800]], crop_foreground=True
    )
    again = VolumeSpec.model_validate_json(spec.model_dump_json())
    assert again == spec and again.channels() == ["abdomen", "[400.0, 1800.0]"] and again.hu
    assert VolumeSpec(spacing=[1, 1, 1], size=[8, 8, 8], hu_range=[-1000, 1000]).channels() == [
        "hu [-1000.0, 1000.0]"
    ]
    assert not VolumeSpec(spacing=[1, 1, 1], size=[8, 8, 8]).hu  # MR: a percentile range
    for bad in (
        dict(windows=["softish"]),
        dict(hu_range=[100, -100]),
        dict(spacing=[0, 1, 1]),
        dict(size=[0, 8, 8]),
        dict(orientation="RAS"),  # one convention, LPS
        dict(window="abdomen"),  # a typo is an error, not ignored
    ):
        with pytest.raises(ValidationError):
            VolumeSpec(**{"spacing": [1, 1, 1], "size": [8, 8, 8], **bad})
    # `apply` itself refuses labels on another grid (serving and training call it without curation).
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.zeros((4, 6, 6), np.int16))
    lab = sitk.GetImageFromArray(np.zeros((4, 6, 6), np.uint8))
    lab.SetSpacing((1.0, 1.0, 2.0))
    with pytest.raises(InputError, match=r"label spacing \[1.0, 1.0, 2.0\] mm != image \[1.0, 1.0, 1.0\] mm"):
        spec.apply(img, lab, "seg.nii.gz")
    with pytest.raises(InputError, match="a MR volume needs a spec with no windows"):
        spec.check_modality("MR", "t2.nii.gz")
    with pytest.raises(InputError, match="a CT volume needs a spec with windows or hu_range"):
        VolumeSpec(spacing=[1, 1, 1], size=[8, 8, 8]).check_modality("CT", "ct.nii.gz")


# ---------------------------------------------------------------- real volumes, read independently


@pytest.mark.parametrize(("name", "code"), [("anatomical.nii", "LAS"), ("standard.nii.gz", "RAS")])
def test_nibabel_samples_orientation_spacing_and_values(name, code):
    """nibabel's own samples (LAS; RAS with 1 x 3 x 2 mm voxels): the file's orientation and spacing are
    recorded as nibabel reads them, and the stored array is the file's values reoriented to [S, P, L]."""
    path = NIBABEL_DATA / name
    want, affine, got_code = nib_lps(path)
    assert got_code == code
    zooms = [float(z) for z in nib.load(str(path)).header.get_zooms()[:3]]
    spec = same_grid_spec(want, zooms)
    v = spec.apply(read_volume(path, name))
    assert v.source == {
        "size": list(nib.load(str(path)).shape),
        "spacing_mm": pytest.approx(zooms, abs=1e-6),
        "orientation": code,
    }
    assert v.array.shape == (1, *want.shape)
    assert np.abs(v.array[0].astype(int) - by_hand_percentile(want)).max() <= 1
    # Voxel [0, 0, 0] of the stored array is the file's most right, anterior, inferior voxel: index 0 of
    # an axis pointing to L, P or S, the last index of one pointing to R, A or I.
    shape = nib.load(str(path)).shape
    corner = affine @ np.array(
        [(n - 1 if c in "RAI" else 0) for c, n in zip(code, shape, strict=True)] + [1.0]
    )
    np.testing.assert_allclose(v.origin_mm, [-corner[0], -corner[1], corner[2]], atol=1e-3)


def test_pydicom_ct_series_and_ct_small_in_hounsfield_units():
    """pydicom's 5-slice CT series (files named out of order, slices stored top-down) and CT_small.dcm:
    the stored window is the HU pydicom computes (its own modality LUT), slice 0 the most inferior."""
    from pydicom.pixels import apply_modality_lut

    folder = PYDICOM_DATA / "dicomdirtests" / "98892001" / "CT5N"
    dss = sorted(
        (pydicom.dcmread(f) for f in folder.iterdir()), key=lambda d: float(d.ImagePositionPatient[2])
    )
    hu = np.stack([apply_modality_lut(d.pixel_array, d) for d in dss]).astype(
        np.float64
    )  # [S, P, L]: IOP is identity
    assert [float(v) for v in dss[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    img, _ = read_dicom_series(folder, "CT5N", "*")
    sy, sx = (float(s) for s in dss[0].PixelSpacing)
    dz = float(dss[1].ImagePositionPatient[2]) - float(dss[0].ImagePositionPatient[2])
    spec = same_grid_spec(hu, (sx, sy, dz), windows=["abdomen", [400, 1800]])
    v = spec.apply(img)
    assert v.source["orientation"] == "LPS" and np.allclose(v.source["spacing_mm"], [sx, sy, dz], atol=1e-5)
    assert np.abs(v.array[0].astype(int) - by_hand_window(hu, 40, 400)).max() <= 1
    assert np.abs(v.array[1].astype(int) - by_hand_window(hu, 400, 1800)).max() <= 1
    np.testing.assert_allclose(v.origin_mm, [float(x) for x in dss[0].ImagePositionPatient], atol=1e-3)

    ds = pydicom.dcmread(PYDICOM_DATA / "CT_small.dcm")
    hu = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)[None]
    spec = same_grid_spec(
        hu, (*[float(s) for s in ds.PixelSpacing][::-1], float(ds.SliceThickness)), hu_range=[-1000, 1550]
    )
    v = spec.apply(read_volume(PYDICOM_DATA / "CT_small.dcm", "CT_small.dcm"))
    assert np.abs(v.array[0].astype(int) - by_hand_window(hu, 275, 2550)).max() <= 1


def test_pydicom_data_enhanced_ct_in_hounsfield_units():
    """pydicom-data's enhanced (multi-frame) CT keeps its rescale in the shared functional groups, which
    pydicom's `apply_modality_lut` does not read: the HU are computed here by hand from those groups. Rows
    run towards the patient's right (IOP [-1, 0, 0, ...]): the stored columns are the file's mirrored."""
    data_store = pytest.importorskip("data_store")
    path = Path(data_store.__file__).parent / "data" / "eCT_Supplemental.dcm"
    ds = pydicom.dcmread(path)
    shared = ds.SharedFunctionalGroupsSequence[0]
    rescale = shared.PixelValueTransformationSequence[0]
    hu = ds.pixel_array * float(rescale.RescaleSlope) + float(rescale.RescaleIntercept)
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == [
        -1,
        0,
        0,
        0,
        1,
        0,
    ]
    z = [
        float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in ds.PerFrameFunctionalGroupsSequence
    ]
    assert z[1] > z[0]  # frames run inferior -> superior: slice order kept
    want = hu[:, :, ::-1]
    sy, sx = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    v = same_grid_spec(want, (sx, sy, z[1] - z[0]), windows=["abdomen"]).apply(read_volume(path, path.name))
    assert v.source["orientation"] == "RPS" and np.allclose(v.source["spacing_mm"], [sx, sy, z[1] - z[0]])
    assert np.abs(v.array[0].astype(int) - by_hand_window(want, 40, 400)).max() <= 1


def test_pydicom_four_slice_series_has_a_gap_and_is_refused():
    """pydicom's 4-slice CT series: its first file lies 202.5 mm below the next three (1.25 mm apart),
    which SimpleITK would read as one volume of 202.5 mm slices."""
    folder = PYDICOM_DATA / "dicomdirtests" / "77654033" / "CT2"
    z = sorted(float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in folder.iterdir())
    assert np.allclose(np.diff(z), [202.5, 1.25, 1.25])
    with pytest.raises(InputError, match=r"missing slice\(s\): 161 absent between 4 slices 1.25 mm apart"):
        read_dicom_series(folder, "CT2", "*")


@needs_spleen
def test_spleen_ct_hounsfield_units_box_and_slice_range_by_hand():
    """The spleen CT (RAS): on its own grid the stored abdomen window is nibabel's HU windowed by hand,
    and the spleen's box and slice range are those of the label's voxels found with NumPy."""
    hu, _, code = nib_lps(SPLEEN_CT)
    seg, _, _ = nib_lps(SPLEEN_SEG)
    assert code == "RAS" and hu.shape == (26, 166, 164)
    zooms = [float(z) for z in nib.load(str(SPLEEN_CT)).header.get_zooms()]
    spec = same_grid_spec(hu, zooms, windows=["abdomen"])
    v = spec.apply(read_volume(SPLEEN_CT, "ct"), read_volume(SPLEEN_SEG, "seg"))
    assert v.source == {
        "size": [164, 166, 26],
        "spacing_mm": pytest.approx(zooms, abs=1e-6),
        "orientation": "RAS",
    }
    assert np.abs(v.array[0].astype(int) - by_hand_window(hu, 40, 400)).max() <= 1
    assert np.array_equal(v.labels, seg.astype(v.labels.dtype))
    lo, hi = hand_box(seg > 0)
    boxes, slices = label_boxes(v.labels, {1: "spleen"})
    union = [min(b[k] for b in boxes) for k in ("z_min", "y_min", "x_min")]
    union += [max(b[k] for b in boxes) for k in ("z_max", "y_max", "x_max")]
    assert union == lo + hi and slices == {"spleen": [lo[0], hi[0]]}


@needs_spleen
def test_spleen_card_stores_what_apply_gives_and_its_box_in_millimetres(tmp_path, monkeypatch):
    """Curated by its shipped card (resampled to 5 x 1.5 x 1.5 mm, two windows, padded): the record's
    spec round-trips, `apply` on the file gives the stored array byte for byte, and the stored box lies
    where nibabel puts the spleen's voxels in millimetres (within a voxel: labels are resampled by nearest
    neighbour)."""
    monkeypatch.setenv("MEDVL_SHARED_DATA", str(SHARED_DATA))
    card = load_card(CARDS / "spleen-ct.yaml")
    out = tmp_path / "spleen"
    report = curate([card], out, workers=1)
    assert_counts_add_up(report, out)
    (row,) = assert_stored_volumes(out)
    spec = VolumeSpec.model_validate_json(row["volume_spec"])
    assert spec == card.opts().volume
    v = json.loads(row["volume"])
    stored = np.load(out / v["file"], allow_pickle=False)
    again = spec.apply(read_volume(SPLEEN_CT, "ct"), read_volume(SPLEEN_SEG, "seg"))
    assert np.array_equal(again.array, stored) and v["origin_mm"] == again.origin_mm
    assert (
        row["labels"] == ["spleen"]
        and v["channels"] == ["abdomen", "bone"]
        and stored.shape == (2, 32, 96, 96)
    )
    assert v["source"]["orientation"] == "RAS"
    # The spleen's voxel centres in LPS millimetres, from nibabel's affine alone.
    img = nib.load(str(SPLEEN_SEG))
    ijk = np.argwhere(np.asarray(img.dataobj) > 0)
    ras = ijk @ img.affine[:3, :3].T + img.affine[:3, 3]
    lps = ras * [-1, -1, 1]
    first = (lps.min(0) - v["origin_mm"]) / v["spacing_mm"][::-1]  # (x, y, z) in stored voxels
    last = (lps.max(0) - v["origin_mm"]) / v["spacing_mm"][::-1]
    boxes = [b for b in v["boxes"] if b["label"] == "spleen"]
    for axis, k in zip("xyz", range(3)):
        lo = min(b[f"{axis}_min"] for b in boxes)
        hi = max(b[f"{axis}_max"] for b in boxes) - 1
        assert abs(lo - first[k]) <= 1 and abs(hi - last[k]) <= 1, (axis, lo, hi, first, last)
    assert v["slices"]["spleen"] == [min(b["z_min"] for b in boxes), max(b["z_max"] for b in boxes)]
    # 5 mm slices kept: the stored slice range is nibabel's, shifted by the padding.
    k = np.unique(ijk[:, 2])
    pad = round((img.affine[2, 3] - v["origin_mm"][2]) / 5.0)
    assert v["slices"]["spleen"] == [int(k.min()) + pad, int(k.max()) + 1 + pad]


@needs_spine
def test_spine_t2_stored_psr_is_reoriented():
    """The T2 is stored PSR: on its own grid the stored array is nibabel's data reoriented to [S, P, L],
    percentile-scaled, and the cord's box is the one NumPy finds there."""
    path, seg_path = SPINE / "t2" / "t2.nii.gz", SPINE / "t2" / "t2_seg-manual.nii.gz"
    t2, _, code = nib_lps(path)
    seg, _, _ = nib_lps(seg_path)
    assert code == "PSR" and t2.shape == (55, 60, 52)
    raw = np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)
    assert np.array_equal(t2, raw.transpose(1, 0, 2)[:, :, ::-1])  # P, S, R -> S, P, L by hand
    spec = same_grid_spec(t2, [1.0, 1.0, 1.0])
    v = spec.apply(read_volume(path, "t2"), read_volume(seg_path, "seg"))
    assert v.source == {"size": [60, 55, 52], "spacing_mm": [1.0, 1.0, 1.0], "orientation": "PSR"}
    assert np.abs(v.array[0].astype(int) - by_hand_percentile(t2)).max() <= 1
    boxes, slices = label_boxes(v.labels, {1: "spinal cord"})
    lo, hi = hand_box(seg > 0)
    assert (
        [min(b["z_min"] for b in boxes), max(b["z_max"] for b in boxes)]
        == slices["spinal cord"]
        == [lo[0], hi[0]]
    )


@needs_spine
def test_spine_card_keeps_both_volumes_in_lps(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVL_SHARED_DATA", str(SHARED_DATA))
    card = load_card(CARDS / "spine-mri.yaml")
    out = tmp_path / "spine"
    report = curate([card], out, workers=1)
    assert_counts_add_up(report, out)
    rows = {r["file"]: r for r in assert_stored_volumes(out)}
    assert set(rows) == {"t1/t1w.nii.gz", "t2/t2.nii.gz"}
    for file, code in (("t1/t1w.nii.gz", "RAS"), ("t2/t2.nii.gz", "PSR")):
        v = json.loads(rows[file]["volume"])
        assert v["source"]["orientation"] == code and rows[file]["labels"] == ["spinal cord"]
        seg = read_volume(SPINE / file.replace(".nii.gz", "_seg-manual.nii.gz"), "seg")
        again = card.opts().volume.apply(read_volume(SPINE / file, file), seg)
        assert np.array_equal(again.array, np.load(out / v["file"], allow_pickle=False))
        # The cord runs head to foot: it spans most slices of the stored volume.
        lo, hi = v["slices"]["spinal cord"]
        assert hi - lo > 40


# ---------------------------------------------------------------- synthetic phantoms, resume


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    from medvl.synth.volumes import write_phantoms

    folder = tmp_path_factory.mktemp("phantoms")
    write_phantoms(folder, 9, shape=(16, 48, 48), seed=2)
    return folder


def test_phantom_volumes_resume_after_kill_9(phantoms, tmp_path):
    """`medvl curate` of the synthetic-3d card (slices and volumes) is SIGKILLed once a part is
    committed; the resumed run's Parquet parts, logs and stored volumes equal a clean run's, byte for
    byte, and every volume record's array is `apply` of its file."""
    env = {**os.environ, "MEDVL_SYNTH_3D": str(phantoms)}
    card_path = CARDS / "synthetic-3d.yaml"
    out, clean = tmp_path / "killed", tmp_path / "clean"
    cmd = [sys.executable, "-m", "medvl.cli", "curate", "--card", str(card_path), "--out", str(out)]
    committed = kill_9_after_commits([*cmd, "--workers", "1", "--shard-records", "4"], out, env=env)
    assert 0 < len(committed) < 9
    os.environ["MEDVL_SYNTH_3D"] = str(phantoms)
    try:
        card = load_card(card_path)
        resumed = curate([card], out, workers=1, shard_records=4)
        report = curate([card], clean, workers=2, shard_records=4)
    finally:
        del os.environ["MEDVL_SYNTH_3D"]
    assert resumed["counts"] == report["counts"]
    assert_counts_add_up(resumed, out)

    def files(o: Path) -> dict:
        return {
            p.relative_to(o): p.read_bytes() for d in ("data", "parts", "volumes") for p in (o / d).iterdir()
        }

    assert files(out) == files(clean)
    assert not list(out.rglob("*.tmp"))
    rows = assert_stored_volumes(out)
    assert len(rows) == 9 == len({r["sha256"] for r in rows})
    spec = card.opts().volume
    for r in rows[:3]:
        v = json.loads(r["volume"])
        img = read_volume(phantoms / r["file"], r["file"])
        lab = read_volume(phantoms / r["file"].replace(".nii.gz", "_seg.nii.gz"), "seg")
        again = spec.apply(img, lab)
        assert np.array_equal(again.array, np.load(out / v["file"], allow_pickle=False))
        names = {int(k): n for k, n in card.label_names.items()}
        assert set(r["labels"]) == {names[int(x)] for x in np.unique(again.labels) if x}
        assert r["body_region"] == r["file"].split("/")[0].capitalize() and r["modality"] == "CT"
    # LPS columns: the liver (patient's right) in the low columns, the spleen (left) in the high ones.
    abdomen = [json.loads(r["volume"]) for r in rows if r["body_region"] == "Abdomen"]
    centre = lambda v, label: [(b["x_min"] + b["x_max"]) / 2 for b in v["boxes"] if b["label"] == label]  # noqa: E731
    assert abdomen and all(
        max(centre(v, "liver")) < v["shape"][3] / 2 < min(centre(v, "spleen")) for v in abdomen
    )


# ---------------------------------------------------------------- bad input


def test_bad_volumes_and_series_are_quarantined_with_the_reason(tmp_path):
    """Each bad volume of a volume card is quarantined with its file and reason, nothing stops the run,
    the counts add up, and only the good volumes leave records (slices and a stored volume)."""
    import SimpleITK as sitk
    from test_curate import write_ct_series
    from test_imaging import write_card

    from medvl.synth.phantom import LABELS, make_phantom

    rng = np.random.default_rng(4)
    p = make_phantom("abdomen", (8, 32, 32), rng, lesion=False)
    spec = {"spacing": [5.0, 12.5, 12.5], "size": [8, 32, 32], "windows": ["abdomen"]}

    nii = tmp_path / "nii"
    nii.mkdir()

    def write(name: str, arr: np.ndarray, spacing=p.spacing[::-1]) -> Path:
        img = sitk.GetImageFromArray(arr, isVector=False)
        img.SetSpacing(tuple(float(s) for s in spacing))
        sitk.WriteImage(img, str(nii / name))
        return nii / name

    write("good.nii.gz", p.hu)
    write("good_seg.nii.gz", p.labels)
    write("grid.nii.gz", p.hu)
    write("grid_seg.nii.gz", p.labels, spacing=(1.0, 1.0, 1.0))  # a label volume on another grid
    nan = p.hu.astype(np.float32)
    nan[3, 10, 10] = np.nan
    nib.save(
        nib.Nifti1Image(nan.transpose(2, 1, 0), np.diag([12.5, 12.5, 5.0, 1.0])), str(nii / "nan.nii.gz")
    )
    four = np.stack([p.hu, p.hu], -1).transpose(2, 1, 0, 3)
    nib.save(nib.Nifti1Image(four, np.diag([12.5, 12.5, 5.0, 1.0])), str(nii / "fourd.nii.gz"))
    whole = write("whole.nii.gz", rng.integers(-1000, 1000, (16, 64, 64)).astype(np.int16)).read_bytes()
    (nii / "whole.nii.gz").unlink()
    (nii / "cut.nii.gz").write_bytes(whole[: len(whole) // 2])  # a truncated gzip stream

    dcm = tmp_path / "dcm"
    hu = np.clip(p.hu, -1024, None)
    for name in ("good", "missing", "duplicated", "spacing"):
        write_ct_series(dcm / name, hu, (1.0, 1.0), 2.5, seed=0)
    by_z = sorted(
        (dcm / "missing").iterdir(), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2])
    )
    by_z[4].unlink()  # a slice from the middle of the series
    first = sorted((dcm / "duplicated").iterdir())[0]
    shutil.copy(first, first.with_name("copy.dcm"))
    moved = sorted(
        (dcm / "spacing").iterdir(), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2])
    )[3]
    ds = pydicom.dcmread(moved)
    ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 1.0]
    ds.save_as(moved)

    common = dict(
        original_task="3D segmentation",
        department="Gastroenterology and Hepatology",
        dedup={"exact": "drop", "near": "keep"},
    )
    cards = [
        load_card(
            write_card(
                nii,
                adapter="nifti",
                modality="CT",
                body_region="Abdomen",
                label_names=LABELS,
                options={"images": "*.nii.gz", "labels": "{dir}/{stem}_seg.nii.gz", "volume": spec},
                **common,
            )
        ),
        load_card(write_card(dcm, adapter="dicom", options={"series": True, "volume": spec}, **common)),
    ]
    out = tmp_path / "out"
    report = curate(cards, out, workers=1)
    assert_counts_add_up(report, out)
    q = quarantined(out)
    problems = {
        "grid_seg.nii.gz": ("labels", "label spacing [1.0, 1.0, 1.0] mm != image [12.5, 12.5, 5.0] mm"),
        "nan.nii.gz": ("image", "1 of 8192 voxels are not finite"),
        "fourd.nii.gz": ("image", "expected a scalar 3D volume, got 4D"),
        "cut.nii.gz": ("image", "truncated gzip stream"),
        "missing": ("series", "missing slice(s): 1 absent between 7 slices 2.5 mm apart"),
        "duplicated": ("series", "duplicated slice: 1 of 9 positions repeat"),
        "spacing": ("series", "inconsistent spacing: slices 1.5 to 3.5 mm apart"),
    }
    assert set(q) == set(problems)
    for file, (field, problem) in problems.items():
        assert q[file]["field"] == field and problem in q[file]["problem"], q[file]
    assert report["counts"]["quarantined"] == len(problems)  # one per bad item: nothing of them is kept
    rows = assert_stored_volumes(out)
    assert sorted(r["file"] for r in rows) == ["good", "good.nii.gz"]
    kept = (
        pq.read_table(sorted((out / "data").glob("*.parquet")), columns=["file"]).column("file").to_pylist()
    )
    assert set(kept) == {"good", "good.nii.gz"}
