"""Scans through `medvl serve` and `medvl chat`: NIfTI files and DICOM series (a folder or a zip) as
slabs of the slices route, on a real loopback server called with the official openai client; bad scans
answered 4xx with one line (4D, NaN, truncated gzip, missing or duplicated slices, too large); a model
folder's own volume spec and token budget (`volumes.json`) used by both."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import SHARED_DATA
from PIL import Image
from test_serve import SETTINGS, assert_error_shape, build_tiny_model, client, data_url, png, post, running
from typer.testing import CliRunner

from medvl import RESEARCH_ONLY
from medvl.errors import InputError
from medvl.imaging import (
    DEFAULT_CT_SPEC,
    DEFAULT_OTHER_SPEC,
    VolumeSpec,
    read_image,
    read_scan,
    scan_slabs,
    slab_count,
    slab_mode,
    volume_slabs,
)
from medvl.model.build import VOLUMES_FILE, VolumePreprocessing, load, load_volumes
from medvl.model.decode import Conversation, generate

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
PYDICOM_SERIES = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests"
CT5N = PYDICOM_SERIES / "98892001" / "CT5N"  # 5 slices, files named out of order
CT2 = PYDICOM_SERIES / "77654033" / "CT2"  # 4 slices, the first 202.5 mm below the others
QUESTION = "Which organs does this scan show?"
VOLUME = replace(SETTINGS, volume_tokens=64, max_volume_bytes=2**20)  # 4 slabs of 16 tokens


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


@pytest.fixture(scope="module")
def vlm(model_dir):
    return load(model_dir)


@pytest.fixture(scope="module")
def server(vlm):
    with running(vlm, VOLUME) as url:
        yield url


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    from medvl.synth.volumes import write_phantoms

    return write_phantoms(tmp_path_factory.mktemp("phantom"), 1, shape=(16, 48, 48), seed=4)[0]


def zipped(files: list[Path], names: list[str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for i, f in enumerate(files):
            z.write(f, (names or [f"series/{f.name}" for f in files])[i])
    return buf.getvalue()


def scan_message(url: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}],
        }
    ]


def in_process(vlm, source, **kw):
    """What the model answers in-process to the scan's slabs as K image parts: what serving must give."""
    slabs = scan_slabs(source, vlm.model.config.image_seq_length, VOLUME.volume_tokens)
    content = [{"type": "image"}] * len(slabs) + [{"type": "text", "text": QUESTION}]
    return generate(vlm, [Conversation([{"role": "user", "content": content}], slabs)], **kw)[0], slabs


@pytest.mark.parametrize(
    ("source", "mime", "channels"),
    [
        ("phantom", "application/gzip", "windows"),  # a CT phantom, .nii.gz
        (NIBABEL_DATA / "anatomical.nii", "application/x-nifti", "adjacent slices"),  # an MR, plain .nii
        (CT5N, "application/zip", "windows"),  # a zipped DICOM series
    ],
)
def test_scans_answer_as_in_process(server, vlm, phantom, source, mime, channels):
    source = phantom if source == "phantom" else source
    data = zipped(sorted(source.iterdir())) if source.is_dir() else source.read_bytes()
    img, modality = read_scan(data)
    assert (modality == "CT") == (channels == "windows")
    assert slab_mode(3 if modality == "CT" else 1) == channels
    want, slabs = in_process(vlm, source if source.is_dir() else data, max_new_tokens=6)
    k = slab_count(DEFAULT_CT_SPEC.size[0], 16, VOLUME.volume_tokens)
    assert len(slabs) == k == 4 and slabs[0].size == (256, 256)
    r = client(server).chat.completions.create(
        model="tiny", messages=scan_message(data_url(data, mime)), max_tokens=6
    )
    assert r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == want.prompt_tokens and r.usage.prompt_tokens > k * 16


def test_scan_and_image_in_one_request(server, vlm, phantom):
    """A scan's part stands for its K slabs; a 2D image beside it stays one image."""
    image = Image.fromarray(np.full((32, 32, 3), 90, np.uint8))
    msg = scan_message(data_url(phantom.read_bytes(), "application/gzip"))
    msg[0]["content"].insert(1, {"type": "image_url", "image_url": {"url": data_url(png(image))}})
    r = client(server).chat.completions.create(model="tiny", messages=msg, max_tokens=4)
    slabs = scan_slabs(phantom, 16, VOLUME.volume_tokens)
    size = vlm.model.config.vision_config.image_size
    content = [{"type": "image"}] * 5 + [{"type": "text", "text": QUESTION}]
    images = [*slabs, read_image(png(image), vlm.preprocessing, size=size)]
    want = generate(vlm, [Conversation([{"role": "user", "content": content}], images)], max_new_tokens=4)[0]
    assert r.choices[0].message.content == want.text and r.usage.prompt_tokens == want.prompt_tokens


def _truncated(path: Path) -> bytes:
    data = path.read_bytes()
    return data[: len(data) * 2 // 3]


@pytest.mark.parametrize(
    ("make", "mime", "status", "says"),
    [
        (lambda p: (NIBABEL_DATA / "example4d.nii.gz").read_bytes(), "application/gzip", 400, "got 4D"),
        (
            lambda p: (NIBABEL_DATA / "resampled_anat_moved.nii").read_bytes(),
            "application/x-nifti",
            400,
            "not finite",
        ),
        (_truncated, "application/gzip", 400, "truncated"),
        (lambda p: zipped(sorted(CT2.iterdir())), "application/zip", 400, "missing slice(s): 161 absent"),
        (
            lambda p: zipped([*sorted(CT5N.iterdir()), next(CT5N.iterdir())], [f"{i}" for i in range(6)]),
            "application/zip",
            400,
            "duplicated slice",
        ),
        (lambda p: zipped([p]), "application/zip", 400, "DICOM series"),  # a zip, but of a NIfTI file
        (lambda p: b"\x89PNG\r\n\x1a\n" + bytes(200), "application/gzip", 400, "not a NIfTI volume"),
        (lambda p: bytes(2**20 + 10), "application/gzip", 413, "above the 1048576-byte limit"),
        (lambda p: p.read_bytes(), "application/x-tar", 400, "is not supported"),
    ],
    ids=[
        "4d",
        "nan",
        "truncated-gzip",
        "missing-slice",
        "duplicated-slice",
        "zip-of-nifti",
        "png",
        "size",
        "tar",
    ],
)
def test_bad_scans_get_4xx_with_one_line(server, phantom, make, mime, status, says):
    r = post(
        server, {"model": "tiny", "messages": scan_message(data_url(make(phantom), mime)), "max_tokens": 2}
    )
    error = assert_error_shape(r, status)
    assert says in error["message"] and "\n" not in error["message"], error
    assert error["param"] == "messages.0.content.0.image_url.url"


def test_zip_bomb_and_voxel_limits(vlm, phantom, tmp_path):
    """A zip whose files unpack past the limit is refused before inflating; a NIfTI header promising
    more voxels than the limit before any voxel is read."""
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a.dcm", bytes(3 * 2**20))  # 3 MiB of zeros: a few KiB zipped
    small = replace(VOLUME, max_volume_voxels=16 * 48 * 48 - 1)
    with running(vlm, small) as url:
        r = post(
            url, {"model": "tiny", "messages": scan_message(data_url(bomb.getvalue(), "application/zip"))}
        )
        error = assert_error_shape(r, 400)
        assert "bytes of files, above the 1048576-byte limit" in error["message"]
        r = post(
            url,
            {"model": "tiny", "messages": scan_message(data_url(phantom.read_bytes(), "application/gzip"))},
        )
        error = assert_error_shape(r, 400)
        assert "above the 36863-voxel limit" in error["message"]


# ---- medvl chat ----


@pytest.mark.parametrize("kind", ["nifti", "folder", "zip"])
def test_chat_reads_scans(model_dir, vlm, phantom, tmp_path, kind):
    from medvl.cli import app

    if kind == "zip":
        (tmp_path / "ct.zip").write_bytes(zipped(sorted(CT5N.iterdir())))
    source = {"nifti": phantom, "folder": CT5N, "zip": tmp_path / "ct.zip"}[kind]
    args = ["chat", "--model", str(model_dir), "--image", str(source), "-q", QUESTION]
    result = CliRunner().invoke(app, [*args, "--max-new-tokens", "5", "--volume-tokens", "64"])
    assert result.exit_code == 0, result.output
    want, _ = in_process(vlm, source, max_new_tokens=5)
    assert RESEARCH_ONLY in result.output and f"medvl> {want.text}".strip() in result.output


@pytest.mark.parametrize(
    ("name", "make", "says"),
    [
        ("4d.nii.gz", lambda p: (NIBABEL_DATA / "example4d.nii.gz").read_bytes(), "got 4D"),
        ("cut.nii.gz", _truncated, "truncated"),
        ("ct2.zip", lambda p: zipped(sorted(CT2.iterdir())), "missing slice(s)"),
    ],
)
def test_chat_bad_scan_is_one_line(model_dir, phantom, tmp_path, name, make, says):
    """The installed command: exit status 1, one line on stderr naming the file and the reason."""
    path = tmp_path / name
    path.write_bytes(make(phantom))
    medvl = Path(sys.executable).with_name("medvl")
    r = subprocess.run(
        [medvl, "chat", "--model", model_dir, "--image", path, "-q", "Findings?"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert str(path) in lines[0] and says in lines[0] and "Traceback" not in r.stderr + r.stdout


def test_chat_reads_the_real_spleen_ct(model_dir, vlm):
    """The abdominal CT of shared/data (HU, RAS on disk): read as CT by its air, its slabs in the three
    windows, answered by `medvl chat` as in-process."""
    from medvl.cli import app

    path = SHARED_DATA / "spleen_ct" / "ct_scan" / "sub-spleen2" / "ct" / "sub-spleen2_ct.nii.gz"
    if not path.is_file():
        pytest.skip("shared data absent")
    img, modality = read_scan(path)
    assert modality == "CT" and img.GetSize() == tuple(nib.load(path).shape)
    want, slabs = in_process(vlm, path, max_new_tokens=5)
    assert len(slabs) == 4 and all(np.asarray(s).std() > 0 for s in slabs)
    args = ["chat", "--model", str(model_dir), "--image", str(path), "-q", QUESTION, "--max-new-tokens", "5"]
    result = CliRunner().invoke(app, [*args, "--volume-tokens", "64"])
    assert result.exit_code == 0, result.output
    assert f"medvl> {want.text}".strip() in result.output


# ---- the model folder's own volume spec and budget ----

# A model trained on thick-slab CT volumes: synthetic-3d's windows and in-plane grid (64 x 64 slabs, where
# the default CT spec's are 256 x 256), but 3 slices of 20 mm (the default: 32 of 5 mm); and a budget of 4
# slabs (the default, 4096 tokens, gives 32). A served scan's prompt tokens tell both apart: a CT phantom
# is 3 slabs with this spec (4 with the default), an MR scan (the default spec) 4 slabs (32 by default).
OWN = VolumePreprocessing(
    volume_tokens=4 * 16,
    specs=(
        VolumeSpec(
            spacing=(20.0, 6.25, 6.25),
            size=(3, 64, 64),
            windows=("abdomen", "lung", "bone"),
            crop_foreground=True,
        ),
    ),
)


@pytest.fixture(scope="module")
def own_model_dir(model_dir, tmp_path_factory) -> Path:
    """The tiny model's folder with the volumes.json training leaves (tests/test_slices_route.py checks
    that training writes it)."""
    folder = tmp_path_factory.mktemp("own") / "m"
    shutil.copytree(model_dir, folder)
    (folder / VOLUMES_FILE).write_text(OWN.model_dump_json())
    return folder


def answer_to(vlm, slabs: list, **kw):
    content = [{"type": "image"}] * len(slabs) + [{"type": "text", "text": QUESTION}]
    return generate(vlm, [Conversation([{"role": "user", "content": content}], slabs)], **kw)[0]


def test_serve_and_chat_read_scans_with_the_models_spec_and_budget(own_model_dir, phantom):
    from medvl.cli import app

    vlm = load(own_model_dir)
    assert vlm.volumes == OWN and load_volumes(own_model_dir) == OWN
    per_image = vlm.model.config.image_seq_length
    ct, modality = read_scan(phantom)
    assert modality == "CT"
    slabs = volume_slabs(OWN.specs[0].apply(ct).array, 3)  # the model's CT spec: 3 slices, 3 slabs
    assert [s.size for s in slabs] == [(64, 64)] * 3
    want = answer_to(vlm, slabs, max_new_tokens=8)
    mr_path = NIBABEL_DATA / "anatomical.nii"
    mr, modality = read_scan(mr_path)
    assert modality == "" and OWN.spec_for(modality) == DEFAULT_OTHER_SPEC  # no MR spec: the default
    mr_want = answer_to(vlm, volume_slabs(DEFAULT_OTHER_SPEC.apply(mr).array, 4), max_new_tokens=4)
    settings = replace(SETTINGS, max_volume_bytes=2**20)  # no volume_tokens: the model's budget
    assert settings.volume_tokens is None
    ct_msg = scan_message(data_url(phantom.read_bytes(), "application/gzip"))
    mr_msg = scan_message(data_url(mr_path.read_bytes(), "application/x-nifti"))
    with running(vlm, settings) as url:
        r = client(url).chat.completions.create(model="tiny", messages=ct_msg, max_tokens=8)
        assert r.choices[0].message.content == want.text and r.usage.prompt_tokens == want.prompt_tokens
        r = client(url).chat.completions.create(model="tiny", messages=mr_msg, max_tokens=4)
        assert r.choices[0].message.content == mr_want.text and r.usage.prompt_tokens == mr_want.prompt_tokens
    # The default spec (4 slabs at this budget) and the default budget (32 MR slabs) would differ.
    default_ct = slab_count(DEFAULT_CT_SPEC.size[0], per_image, OWN.volume_tokens)
    assert default_ct == 4
    assert want.prompt_tokens < answer_to(vlm, [slabs[0]] * default_ct, max_new_tokens=1).prompt_tokens
    assert slab_count(DEFAULT_OTHER_SPEC.size[0], per_image) == 32
    # --volume-tokens overrides the model's budget: 2 slabs of the model's spec
    with running(vlm, replace(settings, volume_tokens=2 * 16)) as url:
        r = client(url).chat.completions.create(model="tiny", messages=ct_msg, max_tokens=2)
    two = answer_to(vlm, volume_slabs(OWN.specs[0].apply(ct).array, 2), max_new_tokens=2)
    assert r.usage.prompt_tokens == two.prompt_tokens < want.prompt_tokens
    args = ["chat", "--model", str(own_model_dir), "--image", str(phantom), "-q", QUESTION]
    result = CliRunner().invoke(app, [*args, "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    assert f"medvl> {want.text}".strip() in result.output
    got = vlm.volumes.slabs(phantom, per_image)  # chat's reader, pixel for pixel
    assert [np.asarray(a).tolist() for a in got] == [np.asarray(b).tolist() for b in slabs]


def test_a_bad_volumes_json_names_the_file(tmp_path):
    ct = OWN.specs[0]
    (tmp_path / VOLUMES_FILE).write_text(json.dumps({"specs": [json.loads(ct.model_dump_json())] * 2}))
    with pytest.raises(InputError, match=r"volumes.json: volumes: specs: .*at most one CT spec"):
        load_volumes(tmp_path)
    assert load_volumes(tmp_path / "absent") == VolumePreprocessing()  # no file: the defaults
