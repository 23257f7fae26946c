"""Radiology report sets: loaders for IU X-ray (Open-i), MIMIC-CXR, CT-RATE and a plain JSONL, the
one report-cleaning function, the report instruction, and conversion into LLaVA training samples.

Every loader returns a :class:`ReportSet`: all the reports the source holds, each with its split
("train", "val", "test"), and `notes` saying what was left out and why (one line per cause, with a
count). Problems that make the whole source unusable raise :class:`BenchmarkError` (file, field,
problem); a user's own JSONL is checked strictly (:class:`medvl.errors.InputError`). See
docs/eval.md, "Report generation".
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

from medvl.errors import InputError
from medvl.eval.benchmarks import BenchmarkError, Item, ct_rate_volume_path
from medvl.imaging import DEFAULT_PREPROCESSING, Preprocessing
from medvl.prompts import IMAGE_TOKEN

SECTIONS = ("findings", "impression", "both")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd")
# A study is shown to the model as at most this many images (IU X-ray and MIMIC-CXR studies are a
# frontal and a lateral view, sometimes more; R2Gen feeds two for IU X-ray).
DEFAULT_MAX_IMAGES = 2
# A CT volume reaches a 2D model as axial slices at these fractions of its extent, windowed for the
# chest (the lung window under medvl's default preprocessing: CT-RATE reports are mostly about the
# lungs): medvl's choice, not MedM-VL's 3D encoder.
CT_SLICE_FRACTIONS = (0.25, 0.5, 0.75)
CT_REGION = "Chest"


def report_instruction(section: str = "findings") -> str:
    """The instruction a report is generated from, in evaluation and in the training samples alike."""
    what = {
        "findings": "the findings section of the radiology report",
        "impression": "the impression section of the radiology report",
        "both": "the radiology report (findings, then impression)",
    }
    if section not in what:
        raise ValueError(f"unknown report section {section!r}; one of {', '.join(SECTIONS)}")
    return f"Write {what[section]} for this study."


def is_volume(path: str | Path) -> bool:
    return str(path).lower().endswith(VOLUME_SUFFIXES)


@dataclass
class Report:
    id: str
    findings: str
    impression: str
    images: list[Path]  # 2D image files, or 3D volumes (CT-RATE)
    split: str = "test"  # "train", "val" or "test"

    def text(self, section: str) -> str:
        """The reference text of `section` ("both": findings, then impression); "" when absent."""
        if section == "findings":
            return self.findings.strip()
        if section == "impression":
            return self.impression.strip()
        return " ".join(t for t in (self.findings.strip(), self.impression.strip()) if t)


@dataclass
class ReportSet:
    source: str  # what was read, for the report
    reports: list[Report]
    notes: list[str] = field(default_factory=list)
    # set by loaders whose reports are single texts (JSONL, kept as `findings`): evaluated as "both"
    single_text: bool = False

    def split(self, name: str, section: str) -> list[Report]:
        """The reports of split `name` that have text in `section` (those without are counted in
        `notes`)."""
        rows = [r for r in self.reports if r.split == name]
        kept = [r for r in rows if r.text(section)]
        if len(kept) < len(rows):
            self.notes.append(f"{name}: {len(rows) - len(kept)} reports without a {section} section left out")
        return kept


# ---------------------------------------------------------------- cleaning


def clean_report(text: str) -> str:
    """R2Gen-style cleaning (Chen et al. 2020, `clean_report_iu_xray` / `_mimic_cxr`), applied to
    references and predictions alike before the "cleaned" scores. In order:

    1. lower-case; newlines and runs of whitespace become one space;
    2. runs of underscores (MIMIC-CXR's de-identification blanks "___") become one "_" (removed in 6);
    3. runs of dots ("..") become one dot;
    4. list numbering, a digit 1-9 followed by ". " at the start or after a space ("1. ", " 2. "),
       becomes a sentence break (R2Gen handles 1-5; a decimal such as "1.5" has no space and is not
       touched here, rule 6 then makes it "15" as in R2Gen);
    5. the text is split into sentences at ". " (and a final ".");
    6. in each sentence the characters " / \\ ' are deleted, and so are . , ? ; * ! % ^ & _ + ( ) : - [ ] { }
       and < = > @ (R2Gen's regex class `[.,?;*!%^&_+():-\\[\\]{}]` holds the range ":-[", which
       also covers <=>?@ and the capitals, moot after lower-casing); so "x-ray" becomes "xray";
    7. spaces are collapsed, empty sentences dropped (R2Gen keeps them), and the sentences are joined
       as "s1 . s2 ." (the dot is a token, as in R2Gen's output).

    Digits other than list numbers are kept, as are de-identification words such as Open-i's "xxxx".
    """
    t = re.sub(r"\s+", " ", text.lower())
    t = re.sub(r"_+", "_", t)
    t = re.sub(r"\.{2,}", ".", t)
    t = re.sub(r"(^|\s)[1-9]\.\s", ". ", t)
    sentences = []
    for s in re.split(r"\.\s|\.$", t.strip()):
        s = re.sub(r"[\"/\\']", "", s)
        s = re.sub(r"[.,?;*!%^&_+():\-\[\]{}<=>@]", "", s)
        s = " ".join(s.split())
        if s:
            sentences.append(s)
    return " . ".join(sentences) + " ." if sentences else ""


# ---------------------------------------------------------------- helpers


def _image_index(root: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> dict[str, Path]:
    """Every image file under `root` by its name without suffix (the first found wins)."""
    index: dict[str, Path] = {}
    for dirpath, _, files in os.walk(root):
        for name in sorted(files):
            low = name.lower()
            suffix = next((s for s in suffixes if low.endswith(s)), None)
            if suffix:
                index.setdefault(name[: -len(suffix)], Path(dirpath) / name)
    return index


def _note_skipped(notes: list[str], counts: Counter) -> None:
    for why, n in counts.items():
        notes.append(f"{n} reports skipped: {why}")


def _norm_split(value: str, where: str) -> str:
    v = value.strip().lower()
    mapped = {"train": "train", "val": "val", "valid": "val", "validate": "val", "validation": "val"}
    if v in mapped:
        return mapped[v]
    if v == "test":
        return "test"
    raise BenchmarkError(f"{where}: split {value!r} is none of train, val/validate, test")


def _r2gen_splits(path: Path, key: Callable[[dict], str]) -> dict[str, str]:
    """R2Gen's `annotation.json` ({"train": [...], "val": [...], "test": [...]}) -> {key: split}."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BenchmarkError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or not set(data) & {"train", "val", "test"}:
        raise BenchmarkError(f"{path}: expected R2Gen's {{'train': [...], 'val': [...], 'test': [...]}}")
    out = {}
    for split, rows in data.items():
        for n, row in enumerate(rows):
            try:
                out[key(row)] = _norm_split(split, str(path))
            except KeyError as e:
                raise BenchmarkError(f"{path}: {split}[{n}]: missing field {e.args[0]!r}") from None
    return out


def _read_csv(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) of a CSV or gzipped CSV."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        yield from enumerate(csv.DictReader(f), start=2)


def _need_columns(path: Path, columns: tuple[str, ...]) -> None:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        header = next(csv.reader(f), [])
    missing = [c for c in columns if c not in header]
    if missing:
        raise BenchmarkError(
            f"{path}: missing column(s) {', '.join(map(repr, missing))} (has: {', '.join(header)})"
        )


# ---------------------------------------------------------------- IU X-ray (Open-i)


def _xml_text(el: ET.Element | None) -> str:
    return " ".join("".join(el.itertext()).split()) if el is not None else ""


def load_iu_xray(path: Path, *, max_images: int = DEFAULT_MAX_IMAGES, **_) -> ReportSet:
    """IU X-ray (Demner-Fushman et al. 2016) as Open-i distributes it: `NLMCXR_reports.tgz` unpacked
    (`ecgen-radiology/*.xml`, one report per file: `<AbstractText Label="FINDINGS">` and
    `Label="IMPRESSION"`, the images as `<parentImage id="CXR1_1_IM-0001-3001">`) and `NLMCXR_png.tgz`
    unpacked (`CXR1_1_IM-0001-3001.png`). `path`: a folder searched recursively for both (or one XML
    file, images beside it). With R2Gen's split file `annotation.json` in the folder, its train/val/
    test lists set the split (matched on the report id, `CXR2384` of R2Gen's `CXR2384_IM-0942`) and
    reports it does not list are left out; without one every report is "test"."""
    path = Path(path)
    if not path.exists():
        raise BenchmarkError(f"{path}: IU X-ray folder or XML file not found")
    root = path if path.is_dir() else path.parent
    xmls = sorted(root.rglob("*.xml")) if path.is_dir() else [path]
    if not xmls:
        raise BenchmarkError(f"{path}: no Open-i report XML files (ecgen-radiology/*.xml) under it")
    split_file = root / "annotation.json"
    splits = (
        _r2gen_splits(split_file, lambda row: str(row["id"]).split("_")[0]) if split_file.exists() else None
    )
    images = _image_index(root)
    reports, skipped = [], Counter()
    for xml in xmls:
        try:
            doc = ET.parse(xml).getroot()
        except ET.ParseError as e:
            raise BenchmarkError(f"{xml}: not valid XML ({e})") from None
        uid = doc.find("uId")
        if uid is None or not uid.get("id"):
            raise BenchmarkError(f"{xml}: missing element 'uId' with an 'id' (not an Open-i report file)")
        rid = uid.get("id", "")
        sections = {el.get("Label", "").upper(): _xml_text(el) for el in doc.iter("AbstractText")}
        if "FINDINGS" not in sections and "IMPRESSION" not in sections:
            raise BenchmarkError(f"{xml}: no AbstractText labelled FINDINGS or IMPRESSION")
        split = "test"
        if splits is not None:
            if rid not in splits:
                skipped["not in R2Gen's annotation.json"] += 1
                continue
            split = splits[rid]
        ids = [el.get("id", "") for el in doc.iter("parentImage")]
        found = [images[i] for i in ids if i in images]
        if not found:
            skipped["no image found (parentImage id + .png/.jpg/.dcm under the folder)"] += 1
            continue
        reports.append(
            Report(
                id=rid,
                findings=sections.get("FINDINGS", ""),
                impression=sections.get("IMPRESSION", ""),
                images=found[:max_images],
                split=split,
            )
        )
    notes = [
        f"split: {'R2Gen annotation.json' if splits is not None else 'none given, every report is test'}"
    ]
    _note_skipped(notes, skipped)
    if not reports:
        raise BenchmarkError(f"{path}: no usable reports ({'; '.join(notes)})")
    return ReportSet(str(path), reports, notes)


# ---------------------------------------------------------------- MIMIC-CXR


MIMIC_SECTIONED = ("mimic_cxr_sectioned.csv", "mimic_cxr_sectioned.csv.gz")
MIMIC_SPLIT = ("mimic-cxr-2.0.0-split.csv.gz", "mimic-cxr-2.0.0-split.csv")


def _mimic_study_folders(root: Path) -> dict[str, Path]:
    """study id (digits) -> folder, for MIMIC-CXR-JPG's `files/pXX/pSUBJECT/sSTUDY/` or a flat
    `<root>/sSTUDY/`. Only three levels are listed: the tree holds ~377k images."""
    found: dict[str, Path] = {}

    def add_studies(folder: Path) -> None:
        with os.scandir(folder) as it:
            for e in it:
                if e.is_dir() and e.name.startswith("s") and e.name[1:].isdigit():
                    found[e.name[1:]] = Path(e.path)

    add_studies(root)
    with os.scandir(root) as top:
        for group in top:  # p10 .. p19
            if group.is_dir() and group.name.startswith("p"):
                with os.scandir(group.path) as subjects:
                    for subject in subjects:
                        if subject.is_dir() and subject.name.startswith("p"):
                            add_studies(Path(subject.path))
    return found


def load_mimic_cxr(path: Path, *, max_images: int = DEFAULT_MAX_IMAGES, **_) -> ReportSet:
    """MIMIC-CXR (Johnson et al. 2019, PhysioNet, credentialed access): the sectioned reports
    `mimic_cxr_sectioned.csv` (or .csv.gz) that the MIMIC-CXR repository's `create_section_files.py`
    writes (columns `study` = "s50414267", `findings`, `impression`), and MIMIC-CXR-JPG's images.
    `path`: that CSV, or the folder holding it. Images: the study folder `sSTUDY/` found under
    `files/` beside the CSV (MIMIC-CXR-JPG's `files/pXX/pSUBJECT/sSTUDY/*.jpg`), else under the CSV's
    folder itself (that layout, or flat `sSTUDY/` folders); the study's images in name order, at most
    `max_images`. Split: `mimic-cxr-2.0.0-split.csv(.gz)` beside the CSV (train/validate/test by
    study), else R2Gen's `annotation.json` (by `study_id`), else every report is "test"."""
    path = Path(path)
    csv_path = path
    if path.is_dir():
        csv_path = next((path / n for n in MIMIC_SECTIONED if (path / n).exists()), path / MIMIC_SECTIONED[0])
    if not csv_path.exists():
        raise BenchmarkError(f"{csv_path}: MIMIC-CXR sectioned reports CSV not found")
    _need_columns(csv_path, ("study", "findings", "impression"))
    folder = csv_path.parent
    image_root = folder / "files" if (folder / "files").is_dir() else folder
    studies = _mimic_study_folders(image_root)
    splits: dict[str, str] | None = None
    split_source = "none given, every report is test"
    split_csv = next((folder / n for n in MIMIC_SPLIT if (folder / n).exists()), None)
    if split_csv is not None:
        _need_columns(split_csv, ("study_id", "split"))
        splits = {
            row["study_id"]: _norm_split(row["split"], f"{split_csv} line {n}")
            for n, row in _read_csv(split_csv)
        }
        split_source = split_csv.name
    elif (folder / "annotation.json").exists():
        splits = _r2gen_splits(folder / "annotation.json", lambda row: str(row["study_id"]))
        split_source = "R2Gen annotation.json"
    reports, skipped = [], Counter()
    for n, row in _read_csv(csv_path):
        study = row["study"].strip()
        if not (study.startswith("s") and study[1:].isdigit()):
            raise BenchmarkError(
                f"{csv_path} line {n}: column 'study': {study!r} is not an 's<digits>' study id"
            )
        sid = study[1:]
        if splits is not None and sid not in splits:
            skipped[f"study not in {split_source}"] += 1
            continue
        folder_of_study = studies.get(sid)
        files = (
            sorted(p for p in folder_of_study.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if folder_of_study
            else []
        )
        if not files:
            skipped[f"no image found for the study under {image_root}"] += 1
            continue
        reports.append(
            Report(
                id=study,
                findings=row["findings"] or "",
                impression=row["impression"] or "",
                images=files[:max_images],
                split=splits[sid] if splits is not None else "test",
            )
        )
    notes = [f"split: {split_source}"]
    _note_skipped(notes, skipped)
    if not reports:
        raise BenchmarkError(f"{csv_path}: no usable reports ({'; '.join(notes)})")
    return ReportSet(str(csv_path), reports, notes)


# ---------------------------------------------------------------- CT-RATE


CT_RATE_COLUMNS = ("VolumeName", "Findings_EN", "Impressions_EN")


def volume_reader_missing() -> str | None:
    """Why CT volumes cannot be read here (None when they can): medvl.imaging must offer
    `read_volume` and the helpers that turn a volume into slices."""
    import medvl.imaging as imaging

    needed = ("read_volume", "to_lps", "volume_planes", "window", "resize_spacing", "DEFAULT_PREPROCESSING")
    missing = [n for n in needed if not hasattr(imaging, n)]
    return f"medvl.imaging has no {', '.join(missing)}" if missing else None


def _load_ct_rate_csv(csv_path: Path, skipped: Counter, readable: bool) -> list[Report]:
    _need_columns(csv_path, CT_RATE_COLUMNS)
    # CT-RATE publishes train and validation reports; its validation set is the one evaluated on.
    split = "train" if "train" in csv_path.name.lower() else "test"
    roots = [csv_path.parent, csv_path.parent.parent, csv_path.parent / "volumes"]
    reports = []
    for _, row in _read_csv(csv_path):
        name = row["VolumeName"].strip()
        if not readable:
            skipped["no volume reader"] += 1
            continue
        volume = ct_rate_volume_path(name, roots)
        if volume is None:
            skipped["volume file not found"] += 1
            continue
        reports.append(Report(name, row["Findings_EN"] or "", row["Impressions_EN"] or "", [volume], split))
    return reports


def load_ct_rate(path: Path, **_) -> ReportSet:
    """CT-RATE (Hamamci et al. 2024, Hugging Face `ibrahimhamamci/CT-RATE`): a reports CSV of its
    `radiology_text_reports/` (`validation_reports.csv` or `train_reports.csv`: `VolumeName`,
    `Findings_EN`, `Impressions_EN`) and the NIfTI volumes, found as `VolumeName` or at CT-RATE's
    nested path (`valid/valid_1/valid_1_a/valid_1_a_1.nii.gz`) under the CSV's folder, its parent or
    `volumes/` beside it. A CSV whose name says "train" is the train split, any other is "test";
    `train_reports.csv` beside the evaluated CSV supplies the training reports for the baselines.
    Volumes are read through medvl.imaging's volume reader (axial slices in the chest window,
    :data:`CT_SLICE_FRACTIONS`); without one, every row is skipped with one note."""
    csv_path = Path(path)
    if not csv_path.is_file():
        raise BenchmarkError(f"{csv_path}: CT-RATE reports CSV not found")
    why_not = volume_reader_missing()
    skipped: Counter = Counter()
    reports = _load_ct_rate_csv(csv_path, skipped, why_not is None)
    train_csv = csv_path.parent / "train_reports.csv"
    if train_csv.exists() and train_csv != csv_path:
        reports += _load_ct_rate_csv(train_csv, skipped, why_not is None)
    notes = []
    if skipped["no volume reader"]:
        notes.append(
            f"{skipped.pop('no volume reader')} CT-RATE rows skipped: {why_not}, so no volume can be read"
        )
    _note_skipped(notes, skipped)
    return ReportSet(str(csv_path), reports, notes)


def volume_images(
    path: Path, size: int | None = None, preprocessing: Preprocessing = DEFAULT_PREPROCESSING
) -> list[Image.Image]:
    """A chest CT volume as the RGB axial slices a 2D model is shown (:data:`CT_SLICE_FRACTIONS`), in
    the window `preprocessing` gives the chest (medvl's default, "auto": the lung window), square
    pixels, long side at most its `max_side` (or `size` when larger)."""
    from medvl.imaging import read_volume, resize_spacing, to_lps, volume_planes, window

    _, (centre, width) = preprocessing.window_for(CT_REGION)
    planes, spacing = volume_planes(to_lps(read_volume(path, str(path))), "axial")
    out = []
    for f in CT_SLICE_FRACTIONS:
        px = window(planes[min(len(planes) - 1, int(f * len(planes)))], centre, width)
        px, _ = resize_spacing(px, spacing, max(size or 0, preprocessing.max_side))
        out.append(Image.fromarray(px).convert("RGB"))
    return out


# ---------------------------------------------------------------- plain JSONL


def load_reports_jsonl(path: Path, **_) -> ReportSet:
    """Your own report set: one JSON object per line, `{"images": ["a.png", ...], "report": "..."}`,
    optionally `"id"` (default: the line number) and `"split"` (train/val/test, default test). Image
    paths are relative to the file's folder (or absolute); volumes (.nii.gz, ...) are allowed.
    Any bad line stops the load with the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"{path}: report JSONL file not found")
    reports = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(where, "line", f"not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise InputError(where, "line", "expected a JSON object")
        images, report = row.get("images"), row.get("report")
        if not isinstance(images, list) or not images or not all(isinstance(i, str) for i in images):
            raise InputError(where, "images", "must be a non-empty list of file paths")
        if not isinstance(report, str) or not report.strip():
            raise InputError(where, "report", "must be a non-empty string")
        files = [path.parent / i for i in images]
        for f in files:
            if not f.is_file():
                raise InputError(where, "images", f"file not found: {f}")
        split = _norm_split(str(row.get("split", "test")), where)
        reports.append(Report(str(row.get("id", n)), report, "", files, split))
    if not reports:
        raise InputError(str(path), "lines", "no reports")
    return ReportSet(str(path), reports, [], single_text=True)


REPORT_LOADERS: dict[str, Callable[..., ReportSet]] = {
    "iu-xray": load_iu_xray,
    "mimic-cxr": load_mimic_cxr,
    "ct-rate": load_ct_rate,
    "reports-jsonl": load_reports_jsonl,
}


def load_reports(bench: str, data: Path, **options) -> ReportSet:
    if bench not in REPORT_LOADERS:
        raise BenchmarkError(f"unknown report benchmark {bench!r}; choose one of {', '.join(REPORT_LOADERS)}")
    rs = REPORT_LOADERS[bench](Path(data), **options)
    seen: set[str] = set()
    for r in rs.reports:
        if r.id in seen:
            raise BenchmarkError(f"{data}: report id {r.id!r} appears twice")
        seen.add(r.id)
    return rs


# ---------------------------------------------------------------- model input and training data


class ReportItem(Item):
    """A report to generate, as the harness's `predict` runs it: the prompt is the report
    instruction alone (no short-answer suffix), and a CT volume is shown as its slices."""

    def prompt(self) -> str:
        return self.question

    def load_images(
        self, size: int | None = None, preprocessing: Preprocessing = DEFAULT_PREPROCESSING
    ) -> list[Image.Image]:
        out = []
        for source in self.images:
            if is_volume(source):
                out += volume_images(Path(source), size, preprocessing)
            else:
                out += Item.load_images(replace(self, images=[source]), size, preprocessing)
        return out


def to_items(reports: list[Report], section: str) -> list[ReportItem]:
    instruction = report_instruction(section)
    return [
        ReportItem(
            id=r.id, question=instruction, kind="report", answer=r.text(section), images=list(r.images)
        )  # type: ignore[arg-type]
        for r in reports
    ]


def training_samples(
    reports: list[Report], section: str = "findings", image_root: Path | None = None
) -> list[dict]:
    """LLaVA-format samples (what medvl.data.conversations reads and every training stage trains
    on): `{"id", "image": path or [paths], "conversations": [{"from": "human", "value": "<image>\\n
    <instruction>"}, {"from": "gpt", "value": report}]}`, one `<image>` per image. Paths are relative
    to `image_root` (give it to the training config as the data's image root) or absolute. Reports
    without text in `section` are left out; volumes are refused (train on their slices instead)."""
    instruction = report_instruction(section)
    out = []
    for r in reports:
        text = r.text(section)
        if not text:
            continue
        if any(is_volume(p) for p in r.images):
            raise InputError(str(r.images[0]), "images", "a 3D volume: training samples need 2D images")
        paths = []
        for p in r.images:
            p = Path(p).resolve()
            if image_root is not None:
                try:
                    p = p.relative_to(Path(image_root).resolve())
                except ValueError:
                    raise InputError(str(p), "images", f"not under the image root {image_root}") from None
            paths.append(str(p))
        human = "".join(f"{IMAGE_TOKEN}\n" for _ in paths) + instruction
        out.append(
            {
                "id": r.id,
                "image": paths[0] if len(paths) == 1 else paths,
                "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": text}],
            }
        )
    return out


def write_training_data(
    bench: str,
    data: Path,
    out: Path,
    *,
    split: str = "train",
    section: str = "findings",
    image_root: Path | None = None,
    max_images: int = DEFAULT_MAX_IMAGES,
) -> Path:
    """Load a report set and write its `split` as a LLaVA-format JSON file `out`; returns `out`."""
    rs = load_reports(bench, data, max_images=max_images)
    if rs.single_text:  # a JSONL report is one whole text
        section = "both"
    samples = training_samples(rs.split(split, section), section, image_root)
    if not samples:
        raise BenchmarkError(f"{data}: no {split} reports with a {section} section")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(samples, indent=1, ensure_ascii=False), encoding="utf-8")
    return out
