"""Radiology report generation: loaders on real-format fixture files (Open-i XML, MIMIC-CXR's sectioned
CSV and split file, CT-RATE's CSV with NIfTI volumes, JSONL), the cleaning rules, the metrics (COCO
scorers, sacreBLEU's interval, degeneracy, CheXbert and BERTScore from tiny local models), the
training-data conversion read by the training loader, and `evaluate_reports` / `medvl eval` end to end
with the tiny random-weights model."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import committed_items
from PIL import Image
from typer.testing import CliRunner

from medvl.errors import InputError
from medvl.eval.benchmarks import BenchmarkError
from medvl.eval.radiology import (
    ReportItem,
    clean_report,
    load_reports,
    report_instruction,
    to_items,
    training_samples,
    write_training_data,
)
from medvl.eval.report_metrics import (
    CHEXBERT_CONDITIONS,
    ClinicalMetrics,
    ClinicalOptions,
    MeteorJar,
    TextMetrics,
    coco_bleu_intervals,
    corpus_bleu_interval,
    degeneracy,
    java_ptb_tokenize,
    label_f1,
    most_frequent_report,
    nearest_neighbours,
    offline_hub,
    python_ptb_tokenize,
)
from medvl.eval.report_task import baseline_predictions, evaluate_reports, rescore_reports
from medvl.eval.stats import resample_indices

JAVA = shutil.which("java") is not None

# ------------------------------------------------------------------ fixture data: chest X-rays with reports


def _chest_xrays(n: int) -> list:
    """n synthetic chest X-rays (medvl.synth) whose labels the reports below describe."""
    from medvl.synth.images import synthesize

    out, seed = [], 0
    while len(out) < n:
        im = synthesize(seed, size=64, modality="X-ray")
        if im.body_region == "chest":
            out.append(im)
        seed += 1
    return out


def _report(im) -> tuple[str, str]:
    """(findings, impression) for a synthetic chest X-ray, in the style of IU X-ray reports."""
    if im.finding == "no finding":
        return (
            "The heart is normal in size. The mediastinum is unremarkable. The lungs are clear. "
            "No pleural effusion or pneumothorax.",
            "No acute cardiopulmonary disease.",
        )
    side, level = im.location.split()[1], im.location.split()[0]
    return (
        f"The heart is normal in size. There is a {im.finding} in the {side} {level} lung zone. "
        "No pneumothorax.",
        f"{im.finding.capitalize()} in the {side} lung.",
    )


SPLITS = ["train"] * 8 + ["val"] * 2 + ["test"] * 4


def write_openi(root: Path) -> Path:
    """Open-i's layout: ecgen-radiology/<n>.xml in its schema, NLMCXR_png/<parentImage id>.png, and
    R2Gen's annotation.json. Report 13 (test) has no image file; reports 15 and 16 are not in the split
    file."""
    (root / "ecgen-radiology").mkdir(parents=True)
    (root / "NLMCXR_png").mkdir()
    annotation: dict[str, list] = {"train": [], "val": [], "test": []}
    images = _chest_xrays(len(SPLITS) + 2)
    for i, im in enumerate(images, start=1):
        findings, impression = _report(im)
        ids = [f"CXR{i}_IM-{i:04d}-1001", f"CXR{i}_IM-{i:04d}-2001"]
        if i != 13:
            for k, image_id in enumerate(ids):
                Image.fromarray(np.roll(im.image, 3 * k, axis=1)).save(
                    root / "NLMCXR_png" / f"{image_id}.png"
                )
        parents = "".join(
            f'<parentImage id="{image_id}"><figureId>F{k + 1}</figureId><caption>Xray Chest PA and Lateral'
            f'</caption><panel type="single"><url>/hadoop/storage/radiology/extract/{image_id}.jpg</url>'
            "</panel></parentImage>"
            for k, image_id in enumerate(ids)
        )
        (root / "ecgen-radiology" / f"{i}.xml").write_text(
            '<?xml version="1.0" encoding="utf-8"?>\n'
            f'<eCitation><meta type="rr"/><uId id="CXR{i}"/><pmcId id="{i}"/><docSource>CXR</docSource>'
            f'<IUXRId id="{i}"/><licenseType>open-access</licenseType>'
            '<MedlineCitation Owner="Indiana University" Status="supplied by publisher">'
            '<Article PubModel="Electronic"><ArticleTitle>Indiana University Chest X-ray Collection'
            "</ArticleTitle><Abstract>"
            '<AbstractText Label="COMPARISON">None.</AbstractText>'
            '<AbstractText Label="INDICATION">XXXX-year-old with cough.</AbstractText>'
            f'<AbstractText Label="FINDINGS">{findings}</AbstractText>'
            f'<AbstractText Label="IMPRESSION">{impression}</AbstractText>'
            "</Abstract></Article></MedlineCitation>"
            f"<MeSH><major>{im.finding}</major></MeSH>{parents}</eCitation>",
            encoding="utf-8",
        )
        if i <= len(SPLITS):
            split = SPLITS[i - 1]
            annotation[split].append(
                {
                    "id": f"CXR{i}_IM-{i:04d}",
                    "report": findings,
                    "image_path": [f"CXR{i}_IM-{i:04d}/0.png", f"CXR{i}_IM-{i:04d}/1.png"],
                    "split": split,
                }
            )
    (root / "annotation.json").write_text(json.dumps(annotation))
    return root


def write_mimic(root: Path) -> Path:
    """MIMIC-CXR: the sectioned CSV, MIMIC-CXR-JPG's files/pXX/pSUBJECT/sSTUDY/<dicom>.jpg, and the
    official split file (gzipped CSV). Study 9 has findings but an empty impression, study 10 none."""
    rows, split_rows = [], []
    for i, im in enumerate(_chest_xrays(12)):
        subject, study = f"100000{i:02d}", f"5{i:07d}"
        folder = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        folder.mkdir(parents=True)
        dicom = f"{i:08x}-aaaaaaaa-bbbbbbbb-cccccccc-dddddddd"
        Image.fromarray(im.image).save(folder / f"{dicom}.jpg", quality=95)
        findings, impression = _report(im)
        if i == 9:
            impression = ""
        if i == 10:
            findings = ""
        rows.append({"study": f"s{study}", "impression": impression, "findings": findings,
                     "last_paragraph": impression, "comparison": ""})  # fmt: skip
        split = "train" if i < 8 else "validate" if i < 9 else "test"
        split_rows.append({"dicom_id": dicom, "study_id": study, "subject_id": subject, "split": split})
    with (root / "mimic_cxr_sectioned.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["study", "impression", "findings", "last_paragraph", "comparison"])
        w.writeheader()
        w.writerows(rows)
    with gzip.open(root / "mimic-cxr-2.0.0-split.csv.gz", "wt", newline="") as f:
        w = csv.DictWriter(f, ["dicom_id", "study_id", "subject_id", "split"])
        w.writeheader()
        w.writerows(split_rows)
    return root / "mimic_cxr_sectioned.csv"


def write_reports_jsonl(root: Path, n_train: int = 8, n_test: int = 4) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, im in enumerate(_chest_xrays(n_train + n_test)):
        Image.fromarray(im.image).save(root / f"{i}.png")
        findings, impression = _report(im)
        split = "train" if i < n_train else "test"
        lines.append(json.dumps({"id": f"r{i}", "images": [f"{i}.png"], "report": findings, "split": split}))
    (root / "reports.jsonl").write_text("\n".join(lines) + "\n")
    return root / "reports.jsonl"


# ------------------------------------------------------------------ cleaning and tokenisation


def test_clean_report_rules() -> None:
    raw = '1. The heart is NORMAL..  2. No effusion;\nX-ray ___ shows (stable) 1.5 cm nodule, and/or "scar"!'
    assert (
        clean_report(raw) == "the heart is normal . no effusion xray shows stable 15 cm nodule andor scar ."
    )
    # list numbers 1-9 break sentences; decimals do not; empty sentences are dropped
    assert clean_report("3. Lungs clear. 7. Heart normal. . ") == "lungs clear . heart normal ."
    assert clean_report("") == "" and clean_report(" ... ") == ""
    # the cleaning is idempotent, so cleaned references and predictions compare alike
    assert clean_report(clean_report(raw)) == clean_report(raw)
    assert clean_report("Heart size normal.") == clean_report("heart size normal")


REPORT_SENTENCES = [
    "The heart is normal in size. The mediastinum is unremarkable. The lungs are clear.",
    "Stable 1.5 cm nodule in the right upper lobe (series 2, image 45).",
    "Heart size is top-normal; mild degenerative changes of the T-spine.",
    "XXXX sternotomy wires are intact. Normal chest x-XXXX.",
    "Lungs are hyperexpanded and/or emphasized; there's no 'focal' consolidation!",
    "Compared to ___, the ET tube is 4.5 cm above the carina. There is a 5% decrease.",
    "Right PICC line ends in the SVC/right atrium; e.g. no change... Dr. ___ was notified at 10:30 a.m.",
    "Left lower lobe opacity -- likely atelectasis -- versus pneumonia? Follow-up recommended.",
    "Heart: normal. Bones: \"intact\" [no fracture] {none}. Can't exclude a small effusion; it isn't large.",
    "A 4.5cm mass; 3x4mm nodule at T12, C-spine post-op, L5-S1 disc. 2.5 x 3.0 cm. Patient's chest & 30x25.",
]


@pytest.mark.skipif(not JAVA, reason="the reference PTBTokenizer needs Java")
def test_python_tokenizer_matches_ptb() -> None:
    assert [python_ptb_tokenize(s) for s in REPORT_SENTENCES] == java_ptb_tokenize(REPORT_SENTENCES)
    # empty texts keep their place
    assert java_ptb_tokenize(["", "Lungs clear.", ""]) == ["", "lungs clear", ""]


# ------------------------------------------------------------------ loaders


def test_iu_xray_loader(tmp_path: Path) -> None:
    root = write_openi(tmp_path / "iu")
    rs = load_reports("iu-xray", root)
    assert [r.split for r in sorted(rs.reports, key=lambda r: int(r.id[3:]))] == [
        s for i, s in enumerate(SPLITS, start=1) if i != 13
    ]
    r = next(r for r in rs.reports if r.id == "CXR1")
    assert r.findings.startswith("The heart is normal in size.") and r.impression
    assert [p.name for p in r.images] == ["CXR1_IM-0001-1001.png", "CXR1_IM-0001-2001.png"]
    assert any("1 reports skipped: no image found" in n for n in rs.notes)
    assert any("2 reports skipped: not in R2Gen" in n for n in rs.notes)
    assert len(load_reports("iu-xray", root, max_images=1).reports[0].images) == 1
    # without the split file every report is test
    (root / "annotation.json").unlink()
    assert {r.split for r in load_reports("iu-xray", root).reports} == {"test"}
    # a broken XML file is named
    (root / "ecgen-radiology" / "3.xml").write_text("<eCitation><uId id='CXR3'/>")
    with pytest.raises(BenchmarkError, match=r"3\.xml: not valid XML"):
        load_reports("iu-xray", root)
    (root / "ecgen-radiology" / "3.xml").write_text("<eCitation><uId id='CXR3'/></eCitation>")
    with pytest.raises(BenchmarkError, match=r"3\.xml: no AbstractText labelled FINDINGS"):
        load_reports("iu-xray", root)


def test_mimic_cxr_loader(tmp_path: Path) -> None:
    csv_path = write_mimic(tmp_path / "mimic")
    rs = load_reports("mimic-cxr", csv_path.parent)  # the folder works as well as the CSV
    assert len(rs.reports) == 12 and "split: mimic-cxr-2.0.0-split.csv.gz" in rs.notes
    assert [len(rs.split(s, "findings")) for s in ("train", "val", "test")] == [8, 1, 2]
    assert any("test: 1 reports without a findings section" in n for n in rs.notes)
    assert len(rs.split("test", "impression")) == 2 and len(rs.split("test", "both")) == 3
    r = rs.reports[0]
    assert r.id == "s50000000" and r.images[0].suffix == ".jpg" and r.images[0].parent.name == "s50000000"
    # a study without images is skipped with a count; a bad study id is an error naming the line
    shutil.rmtree(r.images[0].parent)
    assert any("1 reports skipped: no image found" in n for n in load_reports("mimic-cxr", csv_path).notes)
    text = csv_path.read_text().replace("s50000001", "50000001")
    csv_path.write_text(text)
    with pytest.raises(BenchmarkError, match=r"mimic_cxr_sectioned.csv line 3: column 'study'"):
        load_reports("mimic-cxr", csv_path)
    csv_path.write_text("study,findings\ns1,x\n")
    with pytest.raises(BenchmarkError, match=r"missing column\(s\) 'impression'"):
        load_reports("mimic-cxr", csv_path)


def _write_ct_rate(root: Path) -> Path:
    """CT-RATE: dataset/radiology_text_reports/{validation,train}_reports.csv and NIfTI volumes at
    CT-RATE's nested paths (dataset/valid/valid_1/valid_1_a/valid_1_a_1.nii.gz)."""
    import SimpleITK as sitk

    reports = root / "dataset" / "radiology_text_reports"
    reports.mkdir(parents=True)
    columns = ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]
    for split, prefix, n in (("validation", "valid", 2), ("train", "train", 3)):
        rows = []
        for i in range(1, n + 1):
            name = f"{prefix}_{i}_a_1.nii.gz"
            folder = root / "dataset" / prefix / f"{prefix}_{i}" / f"{prefix}_{i}_a"
            folder.mkdir(parents=True)
            z = np.linspace(-1, 1, 12)[:, None, None]
            yx = np.linspace(-1, 1, 40)
            body = ((yx[None, :, None] ** 2 + yx[None, None, :] ** 2) < 0.8).astype(np.float32)
            hu = np.where(body > 0, -800.0 + 100 * i * np.abs(z), -1000.0).astype(np.int16)
            img = sitk.GetImageFromArray(hu)
            img.SetSpacing((0.8, 0.8, 2.5))
            sitk.WriteImage(img, str(folder / name))
            rows.append(
                [name, "Cough.", "Non-contrast chest CT.", f"Lungs are clear. Finding {i}.", "Normal."]
            )
        with (reports / f"{split}_reports.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(columns)
            w.writerows(rows)
    return reports / "validation_reports.csv"


def test_ct_rate_loader(tmp_path: Path, monkeypatch) -> None:
    import medvl.imaging

    csv_path = _write_ct_rate(tmp_path)
    rs = load_reports("ct-rate", csv_path)
    assert [r.split for r in rs.reports] == ["test", "test", "train", "train", "train"]
    assert rs.reports[0].images[0].name == "valid_1_a_1.nii.gz" and rs.reports[0].findings.startswith("Lungs")
    images = to_items(rs.split("test", "findings"), "findings")[0].load_images(64)
    assert len(images) == 3 and all(im.mode == "RGB" for im in images)
    from medvl.imaging import CT_WINDOWS

    centre, width = CT_WINDOWS["lung"]  # chest CT under the default preprocessing: the lung window
    px = np.asarray(images[1])[..., 0]
    assert px[0, 0] == round((-1000 - centre + width / 2) * 255 / width)  # air at the corner
    assert px[20, 20] > px[0, 0]  # lung (-790 HU in the middle slice) is brighter than air
    # Without a volume reader in medvl.imaging: every row skipped, one note saying how many and why.
    monkeypatch.delattr(medvl.imaging, "read_volume")
    rs = load_reports("ct-rate", csv_path)
    assert rs.reports == [] and rs.notes == [
        "5 CT-RATE rows skipped: medvl.imaging has no read_volume, so no volume can be read"
    ]


def test_reports_jsonl_loader_errors(tmp_path: Path) -> None:
    path = write_reports_jsonl(tmp_path / "j", 2, 1)
    rs = load_reports("reports-jsonl", path)
    assert [r.split for r in rs.reports] == ["train", "train", "test"] and rs.single_text
    bad = tmp_path / "j" / "bad.jsonl"
    for line, field in (
        ('{"images": ["0.png"]}', "report"),
        ('{"images": [], "report": "x"}', "images"),
        ('{"images": ["missing.png"], "report": "x"}', "images"),
        ('{"images": ["0.png"], "report": "x", "split": "dev"}', "split"),
        ("{not json", "line"),
    ):
        bad.write_text('{"images": ["0.png"], "report": "fine"}\n' + line + "\n")
        with pytest.raises((InputError, BenchmarkError), match=r"bad\.jsonl:2"):
            load_reports("reports-jsonl", bad)
        if field != "split":
            with pytest.raises(InputError) as e:
                load_reports("reports-jsonl", bad)
            assert e.value.field == field
    with pytest.raises(BenchmarkError, match="unknown report benchmark"):
        load_reports("nope", path)


# ------------------------------------------------------------------ training data


def test_training_samples_are_read_by_the_training_loader(tmp_path: Path, tiny_model_dir: Path) -> None:
    from medvl.data.conversations import ConversationDataset
    from medvl.model.build import load

    root = write_openi(tmp_path / "iu")
    out = write_training_data("iu-xray", root, tmp_path / "train" / "reports.json", image_root=root)
    samples = json.loads(out.read_text())
    assert len(samples) == 8
    s = samples[0]
    assert s["image"] == ["NLMCXR_png/CXR1_IM-0001-1001.png", "NLMCXR_png/CXR1_IM-0001-2001.png"]
    assert s["conversations"][0]["value"] == "<image>\n<image>\n" + report_instruction("findings")
    assert s["conversations"][1]["value"].startswith("The heart is normal in size.")
    vlm = load(tiny_model_dir)
    ds = ConversationDataset(vlm, [(out, root)], max_length=4096)
    assert len(ds) == 8
    sample, images = ds[0]
    assert len(images) == 2
    # the loss covers the report's tokens: the decoded labels are the report
    labelled = [t for t in sample.labels if t != -100]
    assert s["conversations"][1]["value"][:20] in vlm.tokenizer.decode(labelled)
    # one image: a single path and one placeholder; absolute paths without an image root
    r = load_reports("iu-xray", root, max_images=1).split("train", "impression")
    one = training_samples(r, "impression")[0]
    assert Path(one["image"]).is_absolute() and one["conversations"][0]["value"].count("<image>") == 1
    with pytest.raises(InputError, match="not under the image root"):
        training_samples(r, "impression", image_root=tmp_path / "elsewhere")


# ------------------------------------------------------------------ metrics

# Four cleaned reports and generated reports that share some n-grams with them.
SHORT_REFS = [
    "the heart is normal in size .",
    "lungs are clear .",
    "no pleural effusion .",
    "mild cardiomegaly .",
]
SHORT_HYPS = ["the heart is normal .", "lungs are clear .", "no effusion .", "the heart is big ."]


def test_sacrebleu_interval_matches_sacrebleu() -> None:
    from sacrebleu.metrics import BLEU

    refs, hyps = SHORT_REFS, SHORT_HYPS
    got = corpus_bleu_interval(refs, hyps, tokenize="none", lowercase=False, n=200)
    assert got["bleu"] == pytest.approx(BLEU(tokenize="none").corpus_score(hyps, [refs]).score)
    lo, hi = got["ci95"]
    assert lo <= got["bleu"] <= hi and lo < hi
    assert got == corpus_bleu_interval(refs, hyps, tokenize="none", lowercase=False, n=200)  # fixed seed
    assert "tok:none" in got["signature"]


def test_coco_bleu_interval_from_per_report_statistics() -> None:
    from pycocoevalcap.bleu.bleu import Bleu

    refs, hyps = SHORT_REFS, SHORT_HYPS
    gts, res = {i: [r] for i, r in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)}
    point, _ = Bleu(4).compute_score(gts, res, verbose=0)
    intervals = coco_bleu_intervals(gts, res, point)  # raises unless the statistics reproduce point
    assert len(intervals) == 4
    for (lo, hi), p in zip(intervals, point, strict=True):
        assert lo <= p <= hi and lo < hi
    # The BLEU-1 of a resample is a ratio of summed matches to summed guesses: resampling the one
    # perfect report four times gives 1; its highest possible value.
    assert intervals[0][1] <= 1.0
    with pytest.raises(RuntimeError, match="pycocoevalcap"):
        coco_bleu_intervals(gts, res, [0.5, 0.4, 0.3, 0.2])


def test_text_metrics_and_degeneracy() -> None:
    refs = [
        "The heart is normal in size. The lungs are clear.",
        "There is a nodule in the left upper lung zone. No pneumothorax.",
        "Small right pleural effusion. The heart is normal in size.",
    ]
    tm = TextMetrics(meteor=False)
    try:
        perfect, each = tm.score(refs, refs)
        template, _ = tm.score(refs, [refs[0]] * 3)
    finally:
        tm.close()
    for form in ("raw", "cleaned"):
        assert perfect[form]["bleu_4"] == pytest.approx(1.0) and perfect[form]["rouge_l"] == pytest.approx(
            1.0
        )
        assert perfect[form]["sacrebleu"]["bleu"] == pytest.approx(100.0)
        assert template[form]["bleu_4"] < 0.8 and template[form]["cider"] < perfect[form]["cider"]
        assert perfect[form]["meteor"] is None
    assert len(each) == 3 and each[0]["bleu_4"] == pytest.approx(1.0)
    # Every metric with an interval: a perfect system's resamples are all perfect; the template's
    # intervals hold its point estimate. (METEOR is not run here: no interval either.)
    for form in ("raw", "cleaned"):
        ci = perfect[form]["ci95"]
        assert ci["bleu_4"] == pytest.approx([1.0, 1.0]) and ci["rouge_l"] == pytest.approx([1.0, 1.0])
        assert ci["meteor"] is None
        for k in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider"):
            lo, hi = template[form]["ci95"][k]
            assert lo <= template[form][k] + 1e-12 and template[form][k] <= hi + 1e-12, (form, k)
    d = degeneracy(refs, [refs[0]] * 3)
    assert d["identical_share"] == pytest.approx(2 / 3) and d["unique_reports"] == 1
    assert d["most_repeated"]["count"] == 3 and d["distinct_1"] < d["reference_distinct_1"]
    assert d["mean_length_ratio"] == pytest.approx(np.mean([1, 10 / 12, 1]))  # 10, 12, 10 words
    assert degeneracy(refs, refs)["identical_share"] == 0
    assert most_frequent_report(["Lungs clear.", "lungs clear", "Heart big."]) == ("Lungs clear.", 2)
    train = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert nearest_neighbours(train, np.array([[0.1, 2.0], [3.0, 0.2]])).tolist() == [1, 0]


@pytest.mark.skipif(not JAVA, reason="METEOR needs Java")
def test_meteor_runs_with_java() -> None:
    tm = TextMetrics()
    try:
        scores, each = tm.score(
            ["the lungs are clear", "no effusion"], ["the lungs are clear", "small effusion"]
        )
    finally:
        tm.close()
    assert 0 < scores["cleaned"]["meteor"] < 1 and each[0]["meteor"] > each[1]["meteor"]
    lo, hi = scores["cleaned"]["ci95"]["meteor"]
    assert lo <= scores["cleaned"]["meteor"] <= hi
    assert tm.info()["meteor"].startswith("METEOR 1.5")


@pytest.mark.skipif(not JAVA, reason="METEOR needs Java")
def test_meteor_interval_resamples_the_jar_s_alignment_statistics() -> None:
    refs = [clean_report(r) for r in REPORT_SENTENCES]
    hyps = [clean_report(r) for r in (*REPORT_SENTENCES[5:], *REPORT_SENTENCES[:3])] + ["", "the heart ."]
    jar = MeteorJar()
    try:
        point, each, ci = jar.score(refs, hyps, samples=200)
        # The jar's own corpus score and per-report scores (pycocoevalcap's call, aligning everything).
        own, own_each = jar.jar.compute_score({i: [r] for i, r in enumerate(refs)},
                                              {i: [h] for i, h in enumerate(hyps)})  # fmt: skip
        assert point == own and each == own_each
        assert ci[0] <= point <= ci[1] and ci[0] < ci[1]
        # A resample's EVAL of pooled statistics lines is the jar's score of those reports aligned anew.
        idx = next(resample_indices(len(refs), 1))[0]
        stats = jar.statistics(refs, hyps)
        again, _ = jar.jar.compute_score({k: [refs[i]] for k, i in enumerate(idx)},
                                         {k: [hyps[i]] for k, i in enumerate(idx)})  # fmt: skip
        assert jar.evaluate([stats[i] for i in idx])[0] == pytest.approx(again, abs=1e-12)
        # Deterministic by seed; another seed draws other resamples.
        assert jar.score(refs, hyps, samples=200)[2] == ci
        assert jar.score(refs, hyps, samples=200, seed=1)[2] != ci
    finally:
        jar.close()


def test_label_f1() -> None:
    ref = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 0]])
    hyp = np.array([[1, 0, 0], [0, 1, 1], [1, 0, 0]])
    got = label_f1(ref, hyp, ("a", "b", "c"))
    # a: tp 2 -> 1.0; b: fp 1 -> 0; c: tp 1, fn 1 -> 2/3; micro: tp 3, fp 1, fn 1
    assert got["per_condition"] == pytest.approx({"a": 1.0, "b": 0.0, "c": 2 / 3})
    assert got["micro_f1"] == pytest.approx(6 / 8) and got["macro_f1"] == pytest.approx(5 / 9)


def _tiny_bert(folder: Path):
    """A random 2-layer BERT with a word-piece vocabulary of report words, saved like a hub model."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = sorted(set(clean_report(" ".join(s for r in REPORT_SENTENCES for s in r.split())).split()))
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), model_max_length=128).save_pretrained(folder)
    config = BertConfig(
        vocab_size=5 + len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
    )  # fmt: skip
    BertModel(config).save_pretrained(folder)
    return config


def test_bertscore_and_chexbert_from_local_folders(tmp_path: Path) -> None:
    import torch

    config = _tiny_bert(tmp_path / "bert")
    # CheXbert's released checkpoint layout: DataParallel names, bert.* and 14 linear heads
    torch.manual_seed(0)
    state = {
        f"module.bert.{k}": v for k, v in __import__("transformers").BertModel(config).state_dict().items()
    }
    for i in range(14):
        state[f"module.linear_heads.{i}.weight"] = torch.randn(4 if i < 13 else 2, 32)
        state[f"module.linear_heads.{i}.bias"] = torch.randn(4 if i < 13 else 2)
    torch.save({"model_state_dict": state, "epoch": 3}, tmp_path / "chexbert.pth")
    options = ClinicalOptions(
        chexbert=tmp_path / "chexbert.pth", chexbert_bert=tmp_path / "bert", bertscore_model=tmp_path / "bert"
    )
    metrics = ClinicalMetrics(options)
    refs = ["the heart is normal in size", "there is no pneumothorax", "small pleural effusion"]
    hyps = ["the heart is normal in size", "lungs are clear", "mild cardiomegaly"]
    same, other = metrics.score(refs, refs), metrics.score(refs, hyps)
    assert same["bertscore"]["f1"] == pytest.approx(1.0, abs=1e-5) and other["bertscore"]["f1"] < 0.999
    bs = metrics.info()["models"]["bertscore"]
    assert bs["layer"] == 2 and bs["model_type"] == "bert" and not bs["rescaled"] and "L2" in bs["hash"]
    labels = metrics._chexbert.labels(refs + hyps)
    assert labels.shape == (6, len(CHEXBERT_CONDITIONS)) and set(np.unique(labels)) <= {0, 1}
    if labels[:3].any():  # identical reports agree on every label
        assert same["f1_chexbert"]["14"]["micro_f1"] == 1.0
    assert set(same["f1_chexbert"]) == {"14", "5"}
    assert "radgraph" in metrics.info()["not_run"]["f1_radgraph"]
    # a checkpoint that is not CheXbert's is refused naming the file
    torch.save({"model_state_dict": {"x": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(InputError, match=r"other\.pth: model_state_dict: no bert"):
        ClinicalMetrics(ClinicalOptions(chexbert=tmp_path / "other.pth", chexbert_bert=tmp_path / "bert"))
    assert set(ClinicalMetrics(ClinicalOptions()).info()["not_run"]) == {
        "f1_chexbert",
        "f1_radgraph",
        "bertscore",
    }


def test_offline_hub_is_scoped(monkeypatch) -> None:
    import os

    import huggingface_hub.constants as hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before = hub.HF_HUB_OFFLINE
    with offline_hub():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and hub.HF_HUB_OFFLINE is True
    assert "HF_HUB_OFFLINE" not in os.environ and before == hub.HF_HUB_OFFLINE


# ------------------------------------------------------------------ the task end to end


class PixelOnlyAnswerer:
    """An answerer that is not a local model (as an API model is not): the retrieval baseline falls
    back to pixel embeddings for it."""

    name = "fixed text"
    image_size = None

    def answer(self, prompts, max_new_tokens):
        return ["The heart is normal in size." for _ in prompts]


def test_nearest_neighbour_baseline_pixel_fallback(tmp_path: Path) -> None:
    rs = load_reports("reports-jsonl", write_reports_jsonl(tmp_path / "j"))
    train, test = rs.split("train", "both"), rs.split("test", "both")
    # a test study that is a training image: its nearest neighbour is that training study
    copy = type(train[0])("copy", train[0].findings, "", list(train[0].images), "test")
    rows, info = baseline_predictions(PixelOnlyAnswerer(), train, [*test, copy], "both", None)
    nn = {r["id"]: r for r in rows if r["baseline"] == "nearest_neighbour"}
    assert nn["copy"]["source"] == train[0].id and nn["copy"]["prediction"] == train[0].findings
    assert info["nearest_neighbour"]["embedding"].startswith("pixel fallback")
    assert {r["prediction"] for r in rows if r["baseline"] == "most_frequent"} == {
        info["most_frequent"]["text"]
    }


def test_evaluate_reports_end_to_end(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = write_openi(tmp_path / "iu")
    out = tmp_path / "out"
    report = evaluate_reports(
        tiny_model_dir, "iu-xray", data, out, max_new_tokens=12, batch_size=4, progress=False, meteor=JAVA
    )
    assert report["n"] == 3  # 4 test reports, one without an image
    assert set(report["metrics"]) == {"model", "most_frequent", "nearest_neighbour"}
    for s in report["metrics"].values():
        assert set(s) == {"raw", "cleaned", "clinical", "degeneracy"}
        assert (
            0 <= s["cleaned"]["bleu_4"] <= 1
            and s["cleaned"]["sacrebleu"]["ci95"][0] <= s["cleaned"]["sacrebleu"]["bleu"]
        )
        assert (s["cleaned"]["meteor"] is not None) == JAVA
    # the most frequent training report scored against every test reference
    mf = report["run"]["baselines"]["most_frequent"]
    assert (
        mf["training_reports"] == 8
        and "vision tower" in report["run"]["baselines"]["nearest_neighbour"]["embedding"]
    )
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(
        r["kind"] == "report" and r["question"] == report_instruction() for r in rows
    )
    md = (out / "report.md").read_text()
    assert "For research use only" in md and "## Baselines" in md and "| most_frequent |" in md
    assert "bertscore: not run" in md
    tok = report["implementations"]["text"]["raw_tokenizer"]
    assert ("Java" in tok) == JAVA
    assert len((out / "scored.jsonl").read_text().splitlines()) == 3
    # a second run reuses the predictions; re-scoring reads them without a model
    before = (out / "predictions.jsonl").read_text()
    evaluate_reports(tiny_model_dir, "iu-xray", data, out, max_new_tokens=12, progress=False, meteor=False)
    assert (out / "predictions.jsonl").read_text() == before
    again = rescore_reports(out / "predictions.jsonl", tmp_path / "re", meteor=False)
    assert again["metrics"]["model"]["cleaned"]["bleu_4"] == report["metrics"]["model"]["cleaned"]["bleu_4"]


def test_medvl_eval_cli_routes_report_benchmarks(tmp_path: Path, tiny_model_dir: Path) -> None:
    from medvl.cli import app

    data = write_reports_jsonl(tmp_path / "j")
    _tiny_bert(tmp_path / "bert")
    out = tmp_path / "cli"
    args = ["eval", "--model", str(tiny_model_dir), "--bench", "reports-jsonl", "--data", str(data),
            "--out", str(out), "--max-new-tokens", "8", "--chunk-size", "2",
            "--report-option", "meteor=false", "--report-option", f"bertscore_model={tmp_path / 'bert'}",
            "--report-option", "bertscore_layer=1"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (
        "reports-jsonl: 4 reports generated and scored" in result.output
        and "Not for diagnosis" in result.output
    )
    report = json.loads((out / "report.json").read_text())
    assert (
        report["run"]["section"] == "both"
        and report["implementations"]["clinical"]["models"]["bertscore"]["layer"] == 1
    )
    assert "bertscore" in report["metrics"]["nearest_neighbour"]["clinical"]
    assert committed_items(out / "jobs" / "image") == ["000000", "000001"]  # 4 studies, chunks of 2
    rescored = CliRunner().invoke(
        app,
        ["eval", "--bench", "reports-jsonl", "--rescore", str(out / "predictions.jsonl"),
         "--out", str(tmp_path / "re"), "--report-option", "meteor=false"],
    )  # fmt: skip
    assert rescored.exit_code == 0, rescored.output
    again = json.loads((tmp_path / "re" / "report.json").read_text())
    assert again["metrics"]["model"]["cleaned"] == report["metrics"]["model"]["cleaned"]
    assert "bertscore" not in again["metrics"]["model"]["clinical"]  # not asked for this time
    bad = CliRunner().invoke(app, [*args[:-2], "--report-option", "colour=blue"])
    assert bad.exit_code == 1 and "KEY one of section" in bad.output
    no_model = CliRunner().invoke(app, ["eval", "--bench", "reports-jsonl", "--data", str(data)])
    assert no_model.exit_code == 2 and "give --model <folder>, or --api-base" in no_model.output
    missing = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--bench", "iu-xray",
                                       "--data", str(tmp_path / "nowhere")])  # fmt: skip
    assert missing.exit_code == 1 and "nowhere: IU X-ray folder or XML file not found" in missing.output
    # item prompts are the report instruction alone
    item = to_items(load_reports("reports-jsonl", data).reports[:1], "both")[0]
    assert isinstance(item, ReportItem) and item.prompt() == report_instruction("both")
