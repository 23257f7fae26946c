"""The 3D benchmark: the synthetic multiple-choice set built from labelled CT phantoms (gold answers from
the label volumes on the stored grid), the M3D-VQA and CT-RATE VQA loaders on fixtures written in their
published layouts (tests/data/eval3d/README.md names the source files), and `medvl eval --bench synth3d`
end to end on the tiny preset."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from medvl.cli import app
from medvl.eval.benchmarks import BenchmarkError, load_benchmark, volume_images
from medvl.eval.harness import _images, answerer_volumes, as_answerer, evaluate, volume_budget
from medvl.imaging import VolumeSpec, content_hash, slab_count, volume_slabs
from medvl.synth import benchmark3d as b3
from medvl.synth.phantom import LESION_LABEL, make_phantom
from medvl.volume_facts import side_of, third_of

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "data" / "eval3d"
TINY_TOKENS = 16  # the tiny preset's image tokens per image: (64 px / 16 px patches)^2


def pixels(images) -> list[np.ndarray]:
    return [np.asarray(im) for im in images]


def test_the_benchmark_spec_is_the_synthetic_3d_cards() -> None:
    card = yaml.safe_load((REPO / "configs" / "cards" / "synthetic-3d.yaml").read_text())
    assert VolumeSpec(**card["options"]["volume"]) == b3.SPEC


def test_the_cli_names_every_benchmark_and_the_3d_ones_have_a_breakdown() -> None:
    from medvl.eval.benchmarks import LOADERS
    from medvl.eval.cli import BENCHES
    from medvl.eval.report import PRIMARY_BREAKDOWN

    assert BENCHES.split(", ") == list(LOADERS)
    assert set(PRIMARY_BREAKDOWN) <= set(LOADERS)
    assert {b: PRIMARY_BREAKDOWN.get(b) for b in ("synth3d", "m3d-vqa", "ct-rate-vqa")} == {
        "synth3d": "category",
        "m3d-vqa": "question type",
        "ct-rate-vqa": "question type",
    }


def test_measures_by_hand() -> None:
    assert side_of(40.0, 64) == "patient's left"  # middle column 31.5; LPS columns run leftwards
    assert side_of(20.0, 64) == "patient's right"
    assert side_of(32.5, 64) is None  # within 2 columns of the middle
    assert third_of(3.0, 32) == "lower third (inferior)"
    assert third_of(16.0, 32) == "middle third"
    assert third_of(28.0, 32) == "upper third (superior)"
    assert third_of(10.2, 32) is None  # 3 * 10.7 / 32 = 1.003: on the boundary
    labels = np.zeros((32, 64, 64), np.uint8)
    labels[10:12, 20:25, 40:45] = LESION_LABEL  # 50 voxels of 5 x 6.25 x 6.25 mm: 9765.625 mm^3
    facts = b3.lesion_facts(labels, b3.SPEC.spacing)
    assert facts is not None and facts["voxels"] == 50
    assert facts["slice"] == 10.5 and facts["column"] == 42.0
    assert facts["diameter_mm"] == pytest.approx(26.5, abs=0.05)  # (6 V / pi)^(1/3)
    assert b3.size_grade(facts["diameter_mm"]) == "medium (22-36 mm)"
    assert b3.size_grade(15.0) == "small (under 22 mm)" and b3.size_grade(50.0) == "large (36 mm or more)"
    assert b3.size_grade(23.0) is None and b3.size_grade(35.0) is None  # within 2 mm of a boundary
    assert b3.lesion_facts(np.zeros((4, 4, 4), np.uint8), b3.SPEC.spacing) is None


@pytest.mark.parametrize(
    "centre, side, third",
    [
        ((0.8, 0.45, 0.3), "patient's right", "upper third (superior)"),
        ((0.2, 0.45, 0.7), "patient's left", "lower third (inferior)"),
    ],
)
def test_gold_answers_come_from_the_label_volume(centre, side, third) -> None:
    # A chest phantom with a 40 mm nodule pinned in a lung: the phantom draws the patient's right in its
    # low columns and its slices from the feet up, so column 0.3 is the right and slice 0.8 superior.
    p = make_phantom("chest", (32, 128, 128), np.random.default_rng(3), lesion=True, lesion_kind="nodule",
                     lesion_center=centre, lesion_radius=20 / 400)  # fmt: skip
    array, labels = b3.prepare(p)
    assert array.shape == (3, 32, 64, 64) and array.dtype == np.uint8 and labels.shape == (32, 64, 64)
    questions = b3.case_questions(labels, "coronal", np.random.default_rng(0))
    gold = {q["category"]: q["options"][q["answer"]] for q in questions}
    assert list(gold) == list(b3.KINDS)
    assert gold["lesion presence"] == "yes"
    assert gold["lesion side"] == side
    assert gold["lesion slice range"] == third
    assert gold["lesion size"] == "large (36 mm or more)"  # a 40 mm sphere
    assert gold["plane"] == "coronal"
    counts = b3.organ_counts(labels)
    organ = next(q for q in questions if q["category"] == "organ")
    assert gold["organ"] in ("lung", "heart", "aorta") and counts[gold["organ"]] >= b3.MIN_VOXELS
    assert len(organ["options"]) == 4 and all(counts[o] == 0 for o in organ["options"] if o != gold["organ"])


def test_a_volume_without_a_lesion_is_asked_only_whether_there_is_one() -> None:
    p = make_phantom("head", (32, 128, 128), np.random.default_rng(5), lesion=False)
    _, labels = b3.prepare(p)
    questions = b3.case_questions(labels, "axial", np.random.default_rng(0))
    assert [q["category"] for q in questions] == ["organ", "lesion presence", "plane"]
    presence = questions[1]
    assert presence["options"][presence["answer"]] == "no" and presence["evidence"] == "lesion voxels: 0"


def test_reformat_shows_each_plane_in_display_order() -> None:
    a = np.zeros((1, 4, 8, 6), np.uint8)
    a[0, 3, 1, 0] = (
        200  # the most superior slice, the second row from the front, the patient's rightmost column
    )
    assert b3.reformat(a, "axial") is a
    coronal = b3.reformat(a, "coronal")  # [C, P, S, L]: 8 sections averaged in pairs down to 4
    assert coronal.shape == (1, 4, 4, 6) and coronal[0, 0, 0, 0] == 100 and int(coronal.sum()) == 100
    sagittal = b3.reformat(a, "sagittal")  # [C, L, S, P]: 6 sections in groups [0, 1) [1, 3) [3, 4) [4, 6)
    assert sagittal.shape == (1, 4, 4, 8) and sagittal[0, 0, 0, 1] == 200 and int(sagittal.sum()) == 200
    with pytest.raises(ValueError, match="oblique"):
        b3.reformat(a, "oblique")


@pytest.fixture(scope="module")
def synth3d(tmp_path_factory) -> Path:
    return b3.build_synth3d(tmp_path_factory.mktemp("synth3d"), n=6)


def read_rows(tsv: Path) -> list[dict]:
    with tsv.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_the_built_benchmark_loads_with_its_volumes(synth3d: Path) -> None:
    rows = read_rows(synth3d)
    notes: list[str] = []
    items = load_benchmark("synth3d", synth3d, notes=notes)
    assert notes == [] and [it.id for it in items] == [r["index"] for r in rows]
    kinds = Counter(r["category"] for r in rows)
    assert kinds["organ"] == kinds["lesion presence"] == kinds["plane"] == 6  # every case asks these
    assert set(kinds) <= set(b3.KINDS) and len(kinds) >= 5
    presence = Counter(r[r["answer"]] for r in rows if r["category"] == "lesion presence")
    assert presence == {"yes": 3, "no": 3}  # cases 0-2 have a lesion, 3-5 none
    for it, r in zip(items, rows, strict=True):
        assert it.volume == synth3d.parent / r["image"] and it.images == [] and it.answer in it.options
        assert it.groups == {"category": r["category"]}
    # A stored array in curation's format and name; a plane question's is the same volume turned.
    array = np.load(items[0].volume, allow_pickle=False)
    assert (
        array.dtype == np.uint8
        and array.shape == (3, 32, 64, 64)
        and items[0].volume.stem == content_hash(array)
    )
    for it, r in zip(items, rows, strict=True):
        if r["category"] == "plane":
            axial = next(np.load(i.volume) for i, q in zip(items, rows, strict=True)
                         if q["case"] == r["case"] and q["category"] == "organ")  # fmt: skip
            assert np.array_equal(np.load(it.volume), b3.reformat(axial, it.options[it.answer]))
    # The model is shown the volume's slabs: as many as the tiny tower's budget pays for.
    slabs = _images(items[0], "image", 64, tokens_per_image=TINY_TOKENS)
    expected = volume_slabs(array, slab_count(32, TINY_TOKENS))
    assert len(slabs) == 32 and all(
        np.array_equal(a, b) for a, b in zip(pixels(slabs), pixels(expected), strict=True)
    )
    blank = _images(items[0], "blank", 64, tokens_per_image=TINY_TOKENS)
    assert len(blank) == 32 and not any(np.asarray(b).any() for b in blank)
    assert len(_images(items[0], "image", 64, tokens_per_image=576)) == 7  # LLaVA-1.5's tower at 4096


def test_a_missing_volume_is_skipped_and_counted(synth3d: Path, tmp_path: Path) -> None:
    data = tmp_path / "bench"
    shutil.copytree(synth3d.parent, data)
    rows = read_rows(data / "synth3d.tsv")
    gone = rows[0]["image"]
    (data / gone).unlink()
    missing = sum(r["image"] == gone for r in rows)
    notes: list[str] = []
    items = load_benchmark("synth3d", data, notes=notes)  # the folder holding synth3d.tsv
    assert len(items) == len(rows) - missing and all(it.volume.name != Path(gone).name for it in items)
    assert notes == [f"{missing} of {len(rows)} questions skipped: volume file not found"]
    other = next(r["image"] for r in rows if r["image"] != gone)
    (data / other).write_bytes(b"not an array")
    notes = []
    load_benchmark("synth3d", data, notes=notes)
    assert any("unreadable volume" in n for n in notes)
    for f in (data / "volumes").iterdir():
        f.unlink()
    with pytest.raises(BenchmarkError, match="no question left"):
        load_benchmark("synth3d", data)


def test_m3d_vqa_loader(tmp_path: Path) -> None:
    # M3D keeps the CSV in Data/data/M3D-VQA/ and `Image Path` under Data/data/ (Bench/eval/eval_vqa.py).
    root = tmp_path / "Data" / "data"
    (root / "M3D-VQA").mkdir(parents=True)
    shutil.copy(FIXTURES / "M3D_VQA_test.csv", root / "M3D-VQA")
    volume = np.random.default_rng(0).random((1, 32, 16, 16), dtype=np.float32)  # M3D's C, D, H, W in 0-1
    path = root / "M3D_Cap_npy" / "ct_case" / "000001" / "Axial_non_contrast.npy"
    path.parent.mkdir(parents=True)
    np.save(path, volume)
    notes: list[str] = []
    items = load_benchmark("m3d-vqa", root / "M3D-VQA", notes=notes)  # the folder: M3D_VQA_test.csv
    assert [(it.id, it.answer, it.groups["question type"]) for it in items] == [
        ("0", "C", "Plane"),
        ("1", "B", "Organ"),
    ]
    assert items[1].options == {"A": "Kidney", "B": "Liver"}  # M3D's NA fillers are no options
    assert items[0].prompt().splitlines()[:3] == [
        "In which plane is this CT image shown?",
        "A. Sagittal",
        "B. Coronal",
    ]
    assert notes == ["1 of 3 questions skipped: volume file not found"]
    assert all(it.volume == path for it in items)
    # One channel: slabs of adjacent slices; at 16 tokens each slab is one slice, its three channels equal.
    slabs = pixels(volume_images(items[0].volume, TINY_TOKENS))
    scaled = np.rint(volume * 255).astype(np.uint8)
    assert len(slabs) == 32 and slabs[5].shape == (16, 16, 3)
    assert np.array_equal(slabs[5], np.repeat(scaled[0, 5][..., None], 3, axis=2))
    np.save(path, volume * 2)  # outside M3D's 0-1
    with pytest.raises(BenchmarkError, match="0-1"):
        volume_images(items[0].volume, TINY_TOKENS)


def write_ct_scan(path: Path) -> Path:
    """A small chest phantom in HU as a NIfTI file (read as CT by its air)."""
    import SimpleITK as sitk

    p = make_phantom("chest", (16, 48, 48), np.random.default_rng(0), lesion=False)
    img = sitk.GetImageFromArray(p.hu)
    img.SetSpacing(tuple(float(s) for s in p.spacing[::-1]))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def test_ct_rate_vqa_loader(tmp_path: Path) -> None:
    shutil.copy(FIXTURES / "valid_vqa.json", tmp_path)
    nested = write_ct_scan(tmp_path / "valid" / "valid_1" / "valid_1_a" / "valid_1_a_1.nii.gz")  # CT-RATE's
    notes: list[str] = []
    items = load_benchmark("ct-rate-vqa", tmp_path, notes=notes)  # the folder: valid_vqa.json
    assert [(it.id, it.kind, it.answer) for it in items] == [
        ("multiple_choice_0-0", "mc", "B"),
        ("short_answer_0-0", "closed", "No."),
        ("short_answer_0-1", "open", "The left upper lobe"),
    ]
    assert items[0].question == "Which finding is seen in the left lung?"
    assert items[0].options == {
        "A": "Pleural effusion",
        "B": "Nodule",
        "C": "Consolidation",
        "D": "Atelectasis",
    }
    assert (
        items[1].question == "Is there a pleural effusion?"
        and items[2].question == "Which lobe holds the nodule?"
    )
    assert [it.groups["question type"] for it in items] == ["multiple_choice", "short_answer", "short_answer"]
    assert notes == [
        "1 of 5 questions skipped: long_answer (not scored as VQA)",
        "1 of 5 questions skipped: volume file not found",
    ]
    assert all(it.volume == nested for it in items)
    # A NIfTI scan is read as chat and the server read it: CT by its air, the default CT spec
    # (32 slices of 256 x 256), one slab per slice at 16 tokens.
    slabs = volume_images(items[0].volume, TINY_TOKENS)
    assert len(slabs) == 32 and slabs[0].size == (256, 256)
    bad = json.loads((tmp_path / "valid_vqa.json").read_text())
    bad[0]["conversations"][1]["value"] = "(e) none"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(BenchmarkError, match="names no choice"):
        load_benchmark("ct-rate-vqa", tmp_path / "bad.json")


def test_medvl_eval_synth3d_end_to_end(tiny_model_dir: Path, synth3d: Path, tmp_path: Path) -> None:
    assert as_answerer(tiny_model_dir).tokens_per_image == TINY_TOKENS  # 32 slabs of a 32-slice volume
    data = tmp_path / "bench"
    shutil.copytree(synth3d.parent, data)
    rows = read_rows(data / "synth3d.tsv")
    gone = rows[-1]["image"]  # a plane question's volume
    (data / gone).unlink()
    missing = sum(r["image"] == gone for r in rows)
    out = tmp_path / "out"
    args = ["eval", "--model", str(tiny_model_dir), "--bench", "synth3d", "--data", str(data / "synth3d.tsv"),
            "--out", str(out), "--max-new-tokens", "4", "--batch-size", "8"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"synth3d: {len(rows) - missing} questions scored" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["notes"] == [f"{missing} of {len(rows)} questions skipped: volume file not found"]
    assert report["run"]["volume_tokens"] == 4096
    kinds = report["breakdowns"]["category"]
    assert set(kinds) == {r["category"] for r in rows if r["image"] != gone}
    guess = {"organ": 1 / 4, "lesion presence": 1 / 2, "lesion side": 1 / 2, "lesion slice range": 1 / 3,
             "lesion size": 1 / 3, "plane": 1 / 3}  # fmt: skip
    for kind, m in kinds.items():
        assert m["random_guess"] == pytest.approx(guess[kind])
        lo, hi = m["ci95"]["accuracy"]
        assert lo <= m["accuracy"] <= hi
    assert sum(m["n"] for m in kinds.values()) == report["overall"]["n"] == len(rows) - missing
    md = (out / "report.md").read_text()
    assert "## By category" in md and "| lesion presence |" in md


def test_a_model_reads_volume_questions_with_its_own_spec_and_budget(
    tiny_model_dir: Path, synth3d: Path, tmp_path: Path
) -> None:
    from medvl.model.build import VOLUMES_FILE, VolumePreprocessing

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    own = VolumePreprocessing(volume_tokens=3 * TINY_TOKENS, specs=(b3.SPEC,))  # 3 slabs, synthetic-3d's spec
    (model / VOLUMES_FILE).write_text(own.model_dump_json())
    assert (
        volume_budget(model) == 48
        and volume_budget(model, 64) == 64
        and volume_budget(tiny_model_dir) == 4096
    )
    volumes = answerer_volumes(as_answerer(model))
    assert volumes == own
    item = load_benchmark("synth3d", synth3d)[0]
    assert len(_images(item, "image", 64, tokens_per_image=TINY_TOKENS, volumes=volumes)) == 3
    # A scan through the model's CT spec: 64 x 64 sections (the default CT spec's are 256 x 256).
    scan = volume_images(write_ct_scan(tmp_path / "scan.nii.gz"), TINY_TOKENS, volumes)
    assert len(scan) == 3 and scan[0].size == (64, 64)
    report = evaluate(model, "synth3d", synth3d, tmp_path / "out", limit=2, max_new_tokens=2, progress=False)
    assert report["run"]["volume_tokens"] == 48 and report["overall"]["n"] == 2


def test_the_lesion_probes_pairs_differ_by_their_lesion_or_by_the_square_alone():
    """benchmarks/lesion_probe_3d.py --paired: each pair is one phantom with and without its lesion, and
    under --square the same lesion-free volume twice, the first with a K x K square (+1.5) on one slab;
    --large-only draws the same lesions at the large grade's diameter, so they change more pixels."""
    import importlib.util

    import torch
    from transformers import AutoConfig

    from medvl.model.build import load_preset

    spec = importlib.util.spec_from_file_location(
        "lesion_probe_3d", REPO / "benchmarks" / "lesion_probe_3d.py"
    )
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    cfg = AutoConfig.for_model(**load_preset("tiny-3d").vision_config)
    x, y = probe.paired_pixels(3, 1, None, True, cfg)
    graded, _ = probe.paired_pixels(3, 1, None, False, cfg)
    changed_large = [int((x[i] != x[i + 1]).sum()) for i in range(0, 6, 2)]
    changed_graded = [int((graded[i] != graded[i + 1]).sum()) for i in range(0, 6, 2)]
    assert all(a >= b for a, b in zip(changed_large, changed_graded, strict=True))
    assert changed_large != changed_graded  # not every lesion of seed 1 is drawn large anyway
    assert y.tolist() == [1.0, 0.0] * 3 and x.shape == (6, cfg.num_frames, 3, cfg.image_size, cfg.image_size)
    assert all(not torch.equal(x[i], x[i + 1]) for i in range(0, 6, 2))
    k = 8
    xs, ys = probe.paired_pixels(3, 1, None, False, cfg, square=k)
    assert ys.tolist() == y.tolist()
    for i in range(0, 6, 2):
        diff = xs[i] - xs[i + 1]
        changed = diff.abs() > 1e-6
        assert int(changed.sum()) == k * k * 3 and torch.allclose(diff[changed], torch.tensor(1.5))
        assert len(changed.any(dim=(1, 2, 3)).nonzero()) == 1  # one slab
        assert torch.equal(xs[i + 1], x[i + 1])  # the lesion-free volume of the lesion pair
