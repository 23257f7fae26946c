"""medvl.imaging end to end: the same DICOM file gives the model identical pixel values when it is
curated for training and when it is served or chatted about; bad files are refused with one
`InputError` by every entry point; the preprocessing description travels with records and checkpoints;
importing medvl changes no process-wide setting."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
import torch
import yaml
from PIL import Image
from pydicom.data import get_testdata_file
from test_serve import serving as serving_app

from medvl.errors import InputError
from medvl.imaging import DEFAULT_PREPROCESSING, Preprocessing, read_image, read_volume

# CT (128 px, no BodyPartExamined), MR (64 px, a window in its header), multi-frame MR (10 frames).
SCANS = {"ct": "CT_small.dcm", "mr": "MR_small.dcm", "cine": "emri_small.dcm"}
QUESTION = "What does this scan show?"


def write_card(folder: Path, **fields) -> Path:
    card = dict(
        name=folder.name,
        root=str(folder),
        license="test",
        original_task="2D classification",
        clinical_task="Organ Recognition",
        department="Neurosurgery",
        dedup={"exact": "keep", "near": "keep"},
    )
    path = folder.parent / f"{folder.name}.yaml"
    path.write_text(yaml.safe_dump({**card, **fields}))
    return path


def curated_records(out: Path) -> list[dict]:
    return pq.read_table(sorted((out / "data").glob("*.parquet"))).to_pylist()


def quarantined(out: Path) -> dict[str, dict]:
    path = out / "quarantine.jsonl"
    entries = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {Path(e["file"]).name: e for e in entries}


# ---------------------------------------------------------------- the same pixels everywhere


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> tuple[dict[str, dict], Path]:
    """The three scans curated with a card that differs from every default where it can: body region
    Head (CT in the brain window, not the fallback soft-tissue one) and max_side 100 (the 128 px CT is
    resampled). Returns the record of each scan (the cine by its middle frame) and the card."""
    from medvl.curate.card import load_card
    from medvl.curate.pipeline import curate

    root = tmp_path_factory.mktemp("curation") / "scans"
    root.mkdir()
    for name in SCANS.values():
        shutil.copy(get_testdata_file(name), root / name)
    card = write_card(root, adapter="dicom", body_region="Head", max_side=100, options={"images": "*.dcm"})
    out = root.parent / "out"
    curate([load_card(card)], out, workers=1)
    by_id = {r["id"]: r for r in curated_records(out)}
    recs = {key: by_id[f"scans/{name}"] for key, name in SCANS.items() if key != "cine"}
    recs["cine"] = by_id["scans/emri_small.dcm#frame5"]  # 10 frames: the served one is the middle one
    return recs, card


@pytest.fixture(scope="module")
def model_dir(curated, tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with the curated data's preprocessing, saved as a checkpoint."""
    from medvl.model.build import load

    recs, _ = curated
    vlm = load(tiny_model_dir)
    assert vlm.preprocessing == DEFAULT_PREPROCESSING  # a checkpoint without preprocessing.json
    vlm.preprocessing = Preprocessing.model_validate_json(recs["ct"]["preprocessing"])
    folder = tmp_path_factory.mktemp("model") / "m"
    vlm.save(folder)
    return folder


def training_pixels(vlm, recs: dict[str, dict], tmp: Path) -> dict[str, torch.Tensor]:
    """Pixel values the training collator builds from the curated PNGs."""
    from medvl.data.conversations import Collator, ConversationDataset

    (tmp / "img").mkdir(parents=True)
    rows = []
    for key, rec in recs.items():
        (tmp / "img" / f"{key}.png").write_bytes(rec["image"]["bytes"])
        conv = [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": "A scan."}]
        rows.append({"id": key, "image": f"img/{key}.png", "conversations": conv})
    (tmp / "train.json").write_text(json.dumps(rows))
    data = ConversationDataset(vlm, [(tmp / "train.json", tmp)], max_length=1024)
    collate = Collator(vlm)
    return {key: collate([data[i]])["pixel_values"][0] for i, key in enumerate(recs)}


class TowerInputs:
    """Pixel values entering a vision tower: of one model (a forward pre-hook on
    model.model.vision_tower), or of any model built while it is active (a global pre-hook, for
    `medvl chat`, which loads its own)."""

    def __init__(self, vlm=None) -> None:
        self.vlm, self.seen = vlm, []

    def _hook(self, module, args) -> None:
        from transformers import CLIPVisionModel

        if self.vlm is not None or isinstance(module, CLIPVisionModel):
            self.seen.append(args[0].detach().clone())

    def __enter__(self) -> TowerInputs:
        if self.vlm is not None:
            self.handle = self.vlm.model.model.vision_tower.register_forward_pre_hook(self._hook)
        else:
            self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def one(self) -> torch.Tensor:
        assert len(self.seen) == 1 and self.seen[0].shape[0] == 1, [s.shape for s in self.seen]
        return self.seen.pop()[0]


@contextmanager
def serving(vlm) -> Iterator[str]:
    """`medvl serve`'s FastAPI app on a real uvicorn server on a loopback port."""
    from medvl.serve.api import ServeSettings, create_app

    with serving_app(create_app(vlm, ServeSettings(model_name="tiny", max_tokens=8))) as url:
        yield url


def ask(url: str, data: bytes, mime: str = "application/dicom") -> httpx.Response:
    image = {
        "type": "image_url",
        "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"},
    }
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": [image, {"type": "text", "text": QUESTION}]}],
    }
    return httpx.post(f"{url}/v1/chat/completions", json={**body, "max_tokens": 1}, timeout=120)


def test_curated_training_pixels_equal_served_and_chat_pixels(curated, model_dir, tmp_path):
    """CT_small, MR_small and the middle frame of emri_small: curated to PNG and read by the training
    collator, sent as a DICOM data URL to `medvl serve`, and given to `medvl chat`, reach the vision
    tower as identical pixel values."""
    from typer.testing import CliRunner

    from medvl.cli import app
    from medvl.model.build import load

    recs, _ = curated
    vlm = load(model_dir)
    assert vlm.preprocessing == Preprocessing.model_validate_json(recs["ct"]["preprocessing"])
    trained = training_pixels(vlm, recs, tmp_path / "train")

    served = {}
    with serving(vlm) as url, TowerInputs(vlm) as tower:
        for key, name in SCANS.items():
            r = ask(url, Path(get_testdata_file(name)).read_bytes())
            assert r.status_code == 200, r.text
            served[key] = tower.one()
    chatted = {}
    for key, name in SCANS.items():
        with TowerInputs() as tower:
            args = ["chat", "--model", str(model_dir), "--image", get_testdata_file(name), "-q", QUESTION]
            result = CliRunner().invoke(app, [*args, "--max-new-tokens", "1"])
            assert result.exit_code == 0, result.output
            chatted[key] = tower.one()

    for key in SCANS:
        assert trained[key].shape == (3, 64, 64)
        assert torch.equal(served[key], trained[key]), key
        assert torch.equal(chatted[key], trained[key]), key


def test_the_checkpoints_preprocessing_is_what_makes_them_equal(curated, model_dir):
    """The control: the same CT read with medvl's default preprocessing (soft-tissue window, 1024 px)
    reaches the model as other pixel values, so the test above could fail."""
    from medvl.model.build import load

    recs, _ = curated
    vlm = load(model_dir)
    processor = vlm.processor.image_processor
    png = Image.open(io.BytesIO(recs["ct"]["image"]["bytes"])).convert("RGB")
    trained = processor([png], return_tensors="pt")["pixel_values"]
    ct = get_testdata_file(SCANS["ct"])
    with_checkpoint = processor([read_image(ct, vlm.preprocessing, size=64)], return_tensors="pt")[
        "pixel_values"
    ]
    default = processor([read_image(ct, size=64)], return_tensors="pt")["pixel_values"]
    assert torch.equal(with_checkpoint, trained) and not torch.equal(default, trained)
    assert json.loads(recs["ct"]["meta"])["ct_window"] == "brain"


def test_preprocessing_travels_with_records_and_checkpoints(curated, model_dir, tmp_path):
    from medvl.curate.adapters import card_preprocessing
    from medvl.curate.card import load_card
    from medvl.model.build import PREPROCESSING_FILE, load, load_preprocessing

    recs, card = curated
    want = card_preprocessing(load_card(card))
    assert want == Preprocessing(default_region="Head", max_side=100)
    assert all(Preprocessing.model_validate_json(r["preprocessing"]) == want for r in recs.values())
    assert json.loads((model_dir / PREPROCESSING_FILE).read_text())["default_region"] == "Head"
    assert load_preprocessing(model_dir) == want and load(model_dir).preprocessing == want
    # an explicit window survives JSON (a list) as the pair it was
    explicit = Preprocessing(ct_window=(30, 90), percentiles=(1, 99), percentile_scope="frame")
    assert Preprocessing.model_validate_json(explicit.model_dump_json()) == explicit
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / PREPROCESSING_FILE).write_text('{"ct_window": "liver"}')
    with pytest.raises(
        InputError, match=r"preprocessing.json: preprocessing: ct_window: .*unknown CT window 'liver'"
    ):
        load_preprocessing(broken)


@pytest.mark.parametrize(
    "fields, problem",
    [
        ({"ct_window": "liver"}, "unknown CT window"),
        ({"ct_window": (40, 0)}, "width must be positive"),
        ({"default_region": "Elbow"}, "unknown body region"),
        ({"region_map": {"ELBOW": "Arm"}}, "unknown body region"),
        ({"percentiles": (99, 1)}, "0 <= low < high <= 100"),
        ({"percentile_scope": "slice"}, "'volume' or 'frame'"),
        ({"max_side": 8}, "greater than or equal to 16"),
        ({"windows": {}}, "Extra inputs"),
    ],
)
def test_preprocessing_refuses_what_it_cannot_do(fields, problem):
    with pytest.raises(ValueError, match=problem):
        Preprocessing(**fields)


def test_auto_window_by_region():
    auto = Preprocessing(region_map={"HEADNECK": "Neck"}, default_region="Abdomen")
    assert auto.window_for("Chest") == ("lung", (-600.0, 1500.0))
    assert auto.window_for("HEADNECK") == ("mediastinum", (50.0, 350.0))
    assert auto.window_for(None) == ("abdomen", (40.0, 400.0))  # the card's region
    assert Preprocessing().window_for("Skin") == ("abdomen", (40.0, 400.0))  # no window of its own
    assert Preprocessing(ct_window="bone").window_for("Head") == ("bone", (400.0, 1800.0))
    assert Preprocessing(ct_window=(10, 20)).window_for("Head") == ((10, 20), (10, 20))


# ---------------------------------------------------------------- bad input


def _jpeg_half() -> bytes:
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, "JPEG", quality=90)
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, "PNG")  # 100 Mpx in a few kB
    return buf.getvalue()


def _dicom(cut: bool = False, pixels: bool = True) -> bytes:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    if not pixels:
        del ds.PixelData
    buf = io.BytesIO()
    ds.save_as(buf)
    data = buf.getvalue()
    return data[: len(data) // 2] if cut else data


# file name -> (its bytes, the field named, words of the problem)
BAD_2D = {
    "truncated.jpg": (_jpeg_half, "image", "truncated"),
    "empty.png": (lambda: b"", "file", "empty file"),
    "notes.png": (lambda: b"Patient notes, not a picture.\n" * 10, "image", "not a readable image"),
    "bomb.png": (_bomb, "image", "10000x10000, above the 50000000-pixel limit"),
    "nopixels.dcm": (lambda: _dicom(pixels=False), "PixelData", "no image"),
    "truncated.dcm": (lambda: _dicom(cut=True), "PixelData", "cannot decode"),
}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    (root / "images" / "findings").mkdir(parents=True)
    (root / "dicoms").mkdir()
    for name, (data, _, _) in BAD_2D.items():
        folder = root / "dicoms" if name.endswith(".dcm") else root / "images" / "findings"
        (folder / name).write_bytes(data())
    return root


def _path(root: Path, name: str) -> Path:
    return root / "dicoms" / name if name.endswith(".dcm") else root / "images" / "findings" / name


@pytest.mark.parametrize("name", BAD_2D)
def test_bad_files_one_input_error_from_every_reader(bad_files, name):
    """read_image (chat, the web UI, serving, training's reads) from a path and from bytes, and an
    evaluation item: the same InputError naming the file, the field and the problem, in one line."""
    from medvl.eval.benchmarks import Item

    _, field, problem = BAD_2D[name]
    path = _path(bad_files, name)
    item = Item("1", "q", "open", "", images=[path])
    for read, file in (
        (lambda: read_image(path), str(path)),
        (lambda: read_image(path.read_bytes(), name="upload"), "upload"),
        (lambda: item.load_images(64), str(path)),
    ):
        with pytest.raises(InputError) as e:
            read()
        assert (e.value.file, e.value.field) == (file, field) and problem in e.value.problem
        assert str(e.value) == f"{file}: {field}: {e.value.problem}" and "\n" not in str(e.value)


def test_bad_files_are_quarantined_by_curation(bad_files, tmp_path):
    from medvl.curate.card import load_card
    from medvl.curate.pipeline import curate

    images = write_card(bad_files / "images", adapter="folder", modality="X-ray")
    dicoms = write_card(bad_files / "dicoms", adapter="dicom", options={"images": "*.dcm"})
    out = tmp_path / "out"
    report = curate([load_card(images), load_card(dicoms)], out, workers=1)
    assert report["counts"]["kept"] == 0
    q = quarantined(out)
    assert set(q) == set(BAD_2D)
    for name, (_, field, problem) in BAD_2D.items():
        assert q[name]["field"] == field and problem in q[name]["problem"], q[name]


def test_medvl_chat_reports_a_bad_image_in_one_line(bad_files, tiny_model_dir):
    path = _path(bad_files, "truncated.jpg")
    cmd = [
        sys.executable,
        "-m",
        "medvl.cli",
        "chat",
        "--model",
        str(tiny_model_dir),
        "--image",
        str(path),
        "-q",
        "x",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"medvl: error: {path}: image: corrupt or truncated image data")


def test_medvl_serve_answers_a_bad_image_with_400(bad_files, model_dir):
    from medvl.model.build import load

    with serving(load(model_dir)) as url:
        for name in ("truncated.dcm", "nopixels.dcm"):
            r = ask(url, _path(bad_files, name).read_bytes())
            assert r.status_code == 400, r.text
            message = r.json()["error"]["message"]
            assert "<bytes>: PixelData: " in message and "\n" not in message


def _nifti(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.0, 1.0])), str(path))
    return path


@pytest.fixture(scope="module")
def bad_volumes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("volumes") / "mr"
    root.mkdir()
    rng = np.random.default_rng(0)
    _nifti(root / "nan.nii.gz", np.full((16, 16, 8), np.nan, np.float32))
    spike = rng.normal(100, 10, (16, 16, 8)).astype(np.float32)
    spike[3, 4, 5] = np.inf
    _nifti(root / "inf.nii.gz", spike)
    whole = _nifti(root / "whole.nii.gz", rng.integers(0, 1000, (48, 48, 24)).astype(np.int16))
    data = whole.read_bytes()
    (root / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    return root


VOLUME_PROBLEMS = {
    "nan.nii.gz": "2048 of 2048 voxels are not finite",
    "inf.nii.gz": "1 of 2048 voxels are not finite",
    "cut.nii.gz": "truncated gzip stream",
}


def test_broken_nifti_is_refused_though_simpleitk_reads_it(bad_volumes, tmp_path):
    """SimpleITK reads the cut file (its missing half zero-filled) and the NaN one (as zeros) without a
    word; read_volume refuses them, and curation quarantines them while the good volume is kept."""
    import SimpleITK as sitk

    from medvl.curate.card import load_card
    from medvl.curate.pipeline import curate

    cut = sitk.GetArrayFromImage(sitk.ReadImage(str(bad_volumes / "cut.nii.gz")))
    assert cut.shape == (24, 48, 48) and (cut[-1] == 0).all()
    assert (sitk.GetArrayFromImage(sitk.ReadImage(str(bad_volumes / "nan.nii.gz"))) == 0).all()
    for name, problem in VOLUME_PROBLEMS.items():
        with pytest.raises(InputError, match=problem) as e:
            read_volume(bad_volumes / name, name)
        assert (e.value.file, e.value.field) == (name, "image")
    assert read_volume(bad_volumes / "whole.nii.gz", "whole").GetSize() == (48, 48, 24)

    card = write_card(bad_volumes, adapter="nifti", modality="MR", options={"images": "*.nii.gz"})
    out = tmp_path / "out"
    curate([load_card(card)], out, workers=1)
    q = quarantined(out)
    assert set(q) == set(VOLUME_PROBLEMS)
    for name, problem in VOLUME_PROBLEMS.items():
        assert q[name]["field"] == "image" and problem in q[name]["problem"]
    assert {r["file"] for r in curated_records(out)} == {"whole.nii.gz"}


# ---------------------------------------------------------------- no process-wide settings


def test_importing_and_reading_changes_no_process_wide_setting(bad_volumes):
    """Pillow's pixel limit, SimpleITK's global thread count and the warning filters are left alone by
    importing the readers (the third-party libraries they import add filters of their own) and by
    reading a PNG, a DICOM file and a NIfTI volume."""
    code = f"""
import warnings
import SimpleITK as sitk
from PIL import Image
def state():
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    return Image.MAX_IMAGE_PIXELS, list(warnings.filters), threads
import io
from pydicom.data import get_testdata_file
dicom = get_testdata_file("emri_small.dcm")  # pydicom's data manager imports requests, urllib3
before = state()
import medvl.curate.adapters, medvl.curate.pipeline, medvl.imaging, medvl.synth
imported = state()
assert imported[0] == before[0] and imported[2] == before[2], (before, imported)
ours = ("medvl", "PIL", "pydicom", "SimpleITK", "builtins")
new = [f for f in imported[1] if f not in before[1]]
added = [f for f in new if f[0] == "error" or f[2].__module__.startswith(ours)]
assert not added, added
buf = io.BytesIO()
Image.new("L", (8, 8)).save(buf, "PNG")
medvl.imaging.read_image(buf.getvalue())
medvl.imaging.read_image(dicom)
medvl.imaging.read_volume({str(bad_volumes / "whole.nii.gz")!r}, "whole")
assert state() == imported, (imported, state())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
