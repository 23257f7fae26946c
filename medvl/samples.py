"""Instruction samples and the facts they must agree with, shared by generation and quality filtering.

- `FactSheet` (+ `Region`): what code, never a language model, knows about one curated record: modality,
  body region, department, tasks, positive labels, verified negatives (only where the source annotates
  its whole label space on every image), boxes on the 0-1000 grid, mask-derived locations with the
  left/right convention stated. `fact_sheet(record)` computes it; `to_json`/`from_json` carry it in a
  sample.
- A sample is one LLaVA row: `id`, `image` (absent for text-only), `conversations`, `format`, `lang`,
  `provenance`, `facts`; `options` + `answer` (perception), `box` (region), `pair_id` (Chinese samples:
  the id of their English original).
- `validate(sample, facts)`: the hard rules every generated sample must pass, each failure a short fixed
  reason name (`REASONS`). Mentions are negation-aware; label synonyms and Chinese names live in
  `SYNONYMS` / `ZH_TERMS`; language identification is py3langid's bundled model.

Prompt pieces (image token, multiple-choice layout, option letters, box syntax) come from
`medvl.prompts`, so generated data, evaluation and serving share one format.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from functools import cache
from pathlib import Path

from medvl.errors import InputError
from medvl.prompts import IMAGE_TOKEN, MC_INSTRUCTION, OPTION_LETTERS, box_1000, format_box, mc_answer

FORMATS: tuple[str, ...] = ("caption", "region", "instruction", "dialogue", "perception", "text")
LANGS: tuple[str, ...] = ("en", "zh")
REASONS: tuple[str, ...] = (
    "schema",
    "image token",
    "missing label",
    "asserted absent",
    "laterality",
    "box mismatch",
    "mc options",
    "leak phrase",
    "length",
    "language",
    "zh mismatch",
)

RADIOLOGICAL = "radiological: the patient's right is on the image's left"
# Centroid bands (share of the image width) read as the patient's side; between them: midline. A
# 10%-wide band keeps organs that straddle the midline (bladder, spinal cord, trachea) from being
# given a side.
SIDE_BANDS = (0.45, 0.55)
BACKGROUND_LEVELS = 16  # grey levels above the image's darkest 2% still read as background


# ---------------------------------------------------------------------------------------------- facts


@dataclass(frozen=True)
class Region:
    """Where a label's mask lies. `quadrant` and `vertical` are in the image's frame (the viewer's left
    and right); `side` is the patient's, under the fact sheet's `convention` (None where undefined)."""

    label: str
    area_share: float  # label pixels / image pixels
    quadrant: str  # "upper left" | "upper right" | "lower left" | "lower right"
    vertical: str  # "upper" | "middle" | "lower"
    side: str | None  # "left" | "right" | "midline" | None


@dataclass
class FactSheet:
    record_id: str
    source: str
    split: str
    modality: str
    body_region: str
    department: str
    task: str  # the source's original task
    clinical_task: str
    labels: list[str]  # positives, in source order
    negatives: list[str]  # verified absent; [] unless the source's annotation is exhaustive
    label_space: list[str]
    boxes: list[tuple[str, tuple[int, int, int, int]]]  # (label, 0-1000 box)
    groups: dict[str, str] = field(default_factory=dict)  # label -> its clinical task ({} when unknown)
    regions: list[Region] = field(default_factory=list)
    convention: str | None = None
    width: int = 0
    height: int = 0
    image_sha256: str = ""  # SHA-256 of the PNG file written as images/<sha256>.png
    # The modalities and body regions of the whole job's records: a perception question's distractors
    # come from these first ([] outside a job: then from the vocabulary alone).
    run_modalities: list[str] = field(default_factory=list)
    run_regions: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        # Field by field rather than dataclasses.asdict, whose recursive deep copy of the label space
        # and groups took 4 ms a sheet (146 s of the quickstart's 32k-sample quality run); same JSON.
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["regions"] = [asdict(r) for r in self.regions]
        return json.dumps(d, ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | dict) -> FactSheet:
        d = json.loads(text) if isinstance(text, str) else dict(text)
        d["boxes"] = [(label, tuple(int(v) for v in box)) for label, box in d["boxes"]]
        d["regions"] = [Region(**r) for r in d.get("regions", [])]
        return cls(**d)

    def counts(self) -> dict[str, int]:
        """Boxes per label, in first-seen order (cell counts for a blood smear)."""
        out: dict[str, int] = {}
        for label, _ in self.boxes:
            out[label] = out.get(label, 0) + 1
        return out

    def region(self, label: str) -> Region | None:
        return next((r for r in self.regions if r.label == label), None)


REQUIRED = ("id", "width", "height", "modality", "labels", "boxes", "source")


def _json_field(record: dict, name: str, default):
    value = record.get(name)
    if value in (None, ""):
        return default
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise InputError(str(record["id"]), name, f"not valid JSON ({e.msg})") from None
    return value


def convention(modality: str, body_region: str, meta: dict, whole_width: bool) -> str | None:
    """The left/right convention of an image: radiological for CT/MR/PET slices other than sagittal
    (curation renders volumes in LPS, so the patient's right is on the image's left) that show the whole
    cross-section across their width, and for frontal radiographs of the trunk; None where the image
    defines no patient side (sagittal slices, microscopy, ultrasound, photographs) or where a cropped
    field of view puts the patient's midline anywhere (a crop around the spleen shows it left of centre
    on some slices)."""
    if modality in ("CT", "MR", "PET"):
        return RADIOLOGICAL if meta.get("axis") != "sagittal" and whole_width else None
    if modality == "X-ray" and body_region in ("Chest", "Abdomen", "Pelvis", "Whole body"):
        return RADIOLOGICAL
    return None


def whole_width(im) -> bool:
    """Whether a slice shows the body's whole width: both outer 3% column strips are background (median
    within 16 grey levels of the image's 2nd percentile). Holds for all 463 of SLAKE's CT and MR slices;
    fails for the spleen CT's cropped slices, where tissue reaches both borders."""
    import numpy as np

    a = np.asarray(im.convert("L"))
    k = max(1, a.shape[1] * 3 // 100)
    floor = float(np.percentile(a[::4, ::4], 2)) + BACKGROUND_LEVELS  # a 1/16 sample: the same level
    return bool(np.median(a[:, :k]) <= floor and np.median(a[:, -k:]) <= floor)


def quadrant_of(cx: float, cy: float) -> str:
    return f"{'upper' if cy < 0.5 else 'lower'} {'left' if cx < 0.5 else 'right'}"


def vertical_of(cy: float) -> str:
    return "upper" if cy < 1 / 3 else "lower" if cy > 2 / 3 else "middle"


def side_of(cx: float, conv: str | None) -> str | None:
    if conv is None:
        return None
    lo, hi = SIDE_BANDS
    return "right" if cx < lo else "left" if cx > hi else "midline"


def decode_image(record: dict):
    """(PNG bytes, decoded PIL image) of a record: stored PNG kept byte for byte, anything else
    re-encoded, after checking that it decodes to the record's width x height. Raises `InputError`
    naming the record."""
    from medvl.imaging import open_image

    rid = str(record.get("id", "?"))
    value = record.get("image")
    data = value.get("bytes") if isinstance(value, dict) else value
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise InputError(rid, "image", "missing image bytes")
    im = open_image(bytes(data), rid)
    if im.size != (record.get("width"), record.get("height")):
        raise InputError(
            rid, "image", f"decodes to {im.size[0]}x{im.size[1]}, not the record's width x height"
        )
    if im.format == "PNG":
        return bytes(data), im
    buf = io.BytesIO()
    im.convert("RGB" if im.mode not in ("L", "RGB") else im.mode).save(buf, format="PNG")
    return buf.getvalue(), im


def fact_sheet(record: dict, decoded: tuple | None = None) -> FactSheet:
    """The facts of one curated record, computed in code. Old curated sets without `split`,
    `annotation` or `regions` read as split "", not exhaustive, no regions. `decoded`: the record's
    `decode_image` when the caller has it (else decoded here). Raises
    `InputError(record id, field, problem)` for a missing field, an unreadable image or a box outside
    the image."""
    rid = str(record.get("id") or "?")
    for name in REQUIRED:
        if record.get(name) is None:
            raise InputError(rid, name, "missing")
    width, height = int(record["width"]), int(record["height"])
    if width <= 0 or height <= 0:
        raise InputError(rid, "width", f"image size {width}x{height} is not positive")
    labels = [str(x) for x in record["labels"]]
    annotation = _json_field(record, "annotation", {})
    space = sorted({*map(str, annotation.get("label_space") or []), *labels})
    negatives = [x for x in space if x not in labels] if annotation.get("exhaustive") else []
    boxes = []
    for i, b in enumerate(record["boxes"]):
        try:
            label, x0, y0, x1, y1 = (
                str(b["label"]),
                *(float(b[k]) for k in ("x_min", "y_min", "x_max", "y_max")),
            )
        except (KeyError, TypeError, ValueError):
            raise InputError(rid, f"boxes[{i}]", "needs label, x_min, y_min, x_max, y_max") from None
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise InputError(rid, f"boxes[{i}]", f"box of {label!r} lies outside the {width}x{height} image")
        boxes.append((label, tuple(box_1000([x0, y0, x1, y1], width, height))))
    modality, body_region = str(record["modality"]), str(record.get("body_region") or "")
    meta = _json_field(record, "meta", {})
    png, im = decoded or decode_image(record)
    conv = convention(modality, body_region, meta if isinstance(meta, dict) else {}, whole_width(im))
    regions = []
    for i, r in enumerate(_json_field(record, "regions", [])):
        try:
            cx, cy = float(r["cx"]), float(r["cy"])
            regions.append(
                Region(
                    str(r["label"]),
                    round(float(r["area_share"]), 4),
                    quadrant_of(cx, cy),
                    vertical_of(cy),
                    side_of(cx, conv),
                )
            )
        except (KeyError, TypeError, ValueError):
            raise InputError(rid, f"regions[{i}]", "needs label, area_share, cx, cy") from None
    return FactSheet(
        record_id=rid,
        source=str(record["source"]),
        split=str(record.get("split") or ""),
        modality=modality,
        body_region=body_region,
        department=str(record.get("department") or ""),
        task=str(record.get("original_task") or ""),
        clinical_task=str(record.get("clinical_task") or ""),
        labels=labels,
        negatives=negatives,
        label_space=space,
        boxes=boxes,
        groups={str(k): str(v) for k, v in (annotation.get("groups") or {}).items()},
        regions=regions,
        convention=conv,
        width=width,
        height=height,
        image_sha256=hashlib.sha256(png).hexdigest(),
    )


# ---------------------------------------------------------------------------------------------- terms

# Other spellings a text may use for a label (lower case). A label counts as mentioned when it or one
# of these appears; the same table serves the negation check, so "no pleural effusion" denies "Effusion".
SYNONYMS: dict[str, tuple[str, ...]] = {
    "effusion": ("pleural effusion",),
    "cardiomegaly": ("enlarged heart", "enlarged cardiac silhouette"),
    "liver cancer": ("liver tumor", "liver tumour", "hepatic tumor", "hepatic tumour"),
    "lung cancer": ("lung tumor", "lung tumour", "pulmonary tumor"),
    "small bowel": ("small intestine",),
    "colon": ("large intestine", "large bowel"),
    "red blood cell": ("red blood cells", "rbc", "erythrocyte", "erythrocytes"),
    "white blood cell": ("white blood cells", "wbc", "leukocyte", "leukocytes"),
    "platelet": ("platelets", "thrombocyte", "thrombocytes"),
    "nodule": ("nodules",),
    "mass": ("masses",),
    "infiltrate": ("infiltration", "infiltrates"),
    "brain edema": ("cerebral edema", "brain oedema"),
    "spinal cord": ("cord",),
}

# Simplified Chinese names of the vocabulary and of the real sources' labels; a Chinese sample may
# name a label by its English spelling or by this name.
# fmt: off
ZH_TERMS: dict[str, str] = {
    # modalities
    "CT": "CT", "MR": "磁共振", "X-ray": "X线", "PET": "PET", "Ultrasound": "超声",
    "Fundus photography": "眼底照相", "OCT": "光学相干断层扫描", "Endoscopy": "内镜",
    "Dermoscopy": "皮肤镜", "Histopathology": "组织病理", "Microscopy": "显微镜",
    "Colposcopy": "阴道镜", "Infrared reflectance imaging": "红外反射成像",
    # body regions
    "Head": "头部", "Neck": "颈部", "Chest": "胸部", "Breast": "乳腺", "Abdomen": "腹部", "Pelvis": "盆腔",
    "Spine": "脊柱", "Upper limb": "上肢", "Lower limb": "下肢", "Eye": "眼部", "Oral cavity": "口腔",
    "Skin": "皮肤", "Whole body": "全身", "Cell": "细胞",
    # departments
    "Cardiovascular Surgery": "心血管外科", "Dermatology": "皮肤科", "Endocrinology": "内分泌科",
    "Gastroenterology and Hepatology": "消化与肝病科", "General Surgery": "普通外科", "Hematology": "血液科",
    "Infectious Diseases": "感染科", "Laboratory Medicine and Pathology": "检验与病理科",
    "Nephrology": "肾内科", "Neurosurgery": "神经外科", "Obstetrics and Gynecology": "妇产科",
    "Oncology": "肿瘤科", "Ophthalmology": "眼科", "Orthopedic Surgery": "骨科", "Otolaryngology": "耳鼻喉科",
    "Pulmonary Medicine": "呼吸科", "Urology": "泌尿外科", "Dentistry": "口腔科",
    # SLAKE
    "Liver": "肝脏", "Spleen": "脾脏", "Left Kidney": "左肾", "Right Kidney": "右肾", "Kidney": "肾脏",
    "Colon": "结肠", "Small Bowel": "小肠", "Stomach": "胃", "Duodenum": "十二指肠", "Rectum": "直肠",
    "Bladder": "膀胱", "Esophagus": "食管", "Heart": "心脏", "Left Lung": "左肺", "Right Lung": "右肺",
    "Lung": "肺", "Trachea": "气管", "Larynx": "喉", "Spinal Cord": "脊髓", "Brain Stem": "脑干",
    "Left Temporal Lobe": "左颞叶", "Right Temporal Lobe": "右颞叶", "Left Eye": "左眼", "Right Eye": "右眼",
    "Left Ear": "左耳", "Right Ear": "右耳", "Left Parotid": "左腮腺", "Right Parotid": "右腮腺",
    "Left Mandible": "左下颌骨", "Right Mandible": "右下颌骨", "Left Femoral Head": "左股骨头",
    "Right Femoral Head": "右股骨头", "Tooth": "牙齿", "Brain Edema": "脑水肿",
    "Brain Enhancing Tumor": "脑强化肿瘤", "Brain Non-enhancing Tumor": "脑非强化肿瘤",
    "Liver Cancer": "肝癌", "Lung Cancer": "肺癌", "Cardiomegaly": "心脏增大", "Atelectasis": "肺不张",
    "Pneumonia": "肺炎", "Nodule": "结节", "Mass": "肿块", "Effusion": "胸腔积液", "Pneumothorax": "气胸",
    "Infiltrate": "浸润",
    # BCCD, BreastMNIST, the volumes
    "red blood cell": "红细胞",
    "white blood cell": "白细胞",
    "platelet": "血小板",
    "RBC": "红细胞", "WBC": "白细胞", "Platelets": "血小板", "malignant": "恶性", "benign": "良性",
    "normal": "正常", "normal or benign": "正常或良性", "spleen": "脾脏", "spinal cord": "脊髓",
    "vertebra": "椎体",
    # the synthetic set (medvl synth)
    "hand": "手", "brain": "脑", "knee joint": "膝关节", "retina": "视网膜",
    "colon mucosa": "结肠黏膜", "lymph node": "淋巴结", "pleural effusion": "胸腔积液", "fracture": "骨折",
    "cyst": "囊肿", "hemorrhage": "出血", "tumor": "肿瘤", "bone marrow edema": "骨髓水肿",
    "retinal hemorrhages": "视网膜出血", "hard exudates": "硬性渗出", "nevus": "色素痣",
    "melanoma": "黑色素瘤", "adenocarcinoma": "腺癌", "metastasis": "转移瘤",
    "grade 1": "1级", "grade 2": "2级", "grade 3": "3级",
    # the synthetic CT phantoms (medvl.synth.phantom)
    "aorta": "主动脉", "bone": "骨骼", "ventricle": "脑室", "lesion": "病灶",
}
# fmt: on


def zh(term: str) -> str:
    """The Chinese name of a vocabulary term or label (case-insensitive), else the term itself."""
    return ZH_TERMS.get(term) or _ZH_LOWER.get(term.lower(), term)


_ZH_LOWER = {k.lower(): v for k, v in ZH_TERMS.items()}


def spellings(label: str) -> tuple[str, ...]:
    """Every spelling that mentions `label`: itself, its synonyms, its Chinese name (lower case)."""
    key = label.lower()
    return tuple(dict.fromkeys((key, *SYNONYMS.get(key, ()), zh(label).lower())))


# ------------------------------------------------------------------------------------------ language


@cache
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


_LETTER = re.compile(r"[^\W\d_]")
_CJK = re.compile("[\u4e00-\u9fff]")
_NON_WORDS = re.compile(r"\[[^\]]*\]|<image>|[0-9]+(?:\.[0-9]+)?%?|[^\w\s]", re.UNICODE)


def lang_of(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of `text` by py3langid's bundled model, after removing box tokens,
    numbers and punctuation (they carry no language and are kept identical across translations)."""
    lang, prob = _identifier().classify(_NON_WORDS.sub(" ", text))
    return str(lang), float(prob)


# ------------------------------------------------------------------------------------------- checks

# Phrases that give away how a sample was made or refuse the task; never in a reply.
LEAK_PHRASES: tuple[str, ...] = (
    "based on the caption",
    "based on the description",
    "according to the caption",
    "according to the annotation",
    "according to the fact sheet",
    "fact sheet",
    "bounding box",
    "annotation",
    "annotated",
    "the label says",
    "as an ai",
    "language model",
    "i cannot see the image",
    "i can't see the image",
    "i am unable to view",
    "i'm unable to view",
    "i cannot view",
    "without seeing the image",
    "no image was provided",
    "i'm sorry",
    "i am sorry",
    "根据描述",
    "根据标注",
    "标注",
    "边界框",
    "作为一个人工智能",
    "作为人工智能",
    "我无法看到",
    "我看不到图像",
    "抱歉",
)

# Reply length bounds in characters (all assistant turns together): (min, max) per format and language.
# Chinese needs about half the characters of English for the same content.
LENGTH_BOUNDS: dict[str, tuple[int, int]] = {
    "caption": (20, 2000),
    "region": (10, 1000),
    "instruction": (20, 3000),
    "dialogue": (10, 4000),
    "perception": (1, 200),
    "text": (5, 2000),
}
MAX_QUESTION_CHARS = 2000
# Language ID is run on the whole conversation; below this many letters it is too short to call.
MIN_LANG_CHARS = 12

_NEG_BEFORE = re.compile(
    r"\b(no|not|without|absent|negative for|free of|rules? out|ruled out|neither|nor|none|never)\b"
    r"|无|没有|未见|未|不|排除|否认",
    re.IGNORECASE,
)
_NEG_AFTER = re.compile(
    r"^\W*(is|are|was|were)?\s*(not|absent|nowhere|never)\b|^[^。；]*?(未见|不可见|缺如|不存在)",
    re.IGNORECASE,
)
_CLAUSE = re.compile(
    r"[.;!?\n,。；！？，]|\bbut\b|\bwhereas\b|\bhowever\b|\balthough\b|但|而|然而", re.IGNORECASE
)
_SENTENCE = re.compile(r"(?<!\d)[.](?!\d)|[;!?\n。；！？]")
_BOX = re.compile(r"\[\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*\]")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_SIDE = re.compile(
    r"patient's (left|right)|(left|right) side of the patient|\b(midline)\b|患者(?:的)?(左|右)侧|(中线)",
    re.IGNORECASE,
)
_QUADRANT = re.compile(r"\b(upper|lower) (left|right)\b|(左上|右上|左下|右下)", re.IGNORECASE)
_VERTICAL = re.compile(r"\b(upper|middle|lower) (?:part|third)\b|图像(上|中|下)部", re.IGNORECASE)
_ZH_SIDE = {"左": "left", "右": "right", "中线": "midline"}
_ZH_QUADRANT = {"左上": "upper left", "右上": "upper right", "左下": "lower left", "右下": "lower right"}
_ZH_VERTICAL = {"上": "upper", "中": "middle", "下": "lower"}


def _is_word(text: str) -> bool:
    return bool(re.search(r"[a-z]", text))


@cache
def _spelling_pattern(spelling: str) -> re.Pattern:
    """English spellings match whole words; Chinese ones anywhere (no spaces between words)."""
    escaped = re.escape(spelling)
    return re.compile(rf"(?<![a-z0-9]){escaped}(?![a-z0-9])" if _is_word(spelling) else escaped)


@cache
def _spelling_pairs(terms: frozenset[str]) -> tuple[tuple[str, str], ...]:
    """(spelling, term) of every term, longest spelling first (ties by text, so the order never depends
    on set iteration). Cached: a dataset's label space is the same for all its records (validating the
    quickstart's 32k samples spent 41 s rebuilding these)."""
    pairs = {(s, t) for t in terms for s in spellings(t) if s}
    return tuple(sorted(pairs, key=lambda p: (-len(p[0]), p[0], p[1])))


def mentions(text: str, terms: Iterable[str]) -> list[tuple[str, int, int]]:
    """(term, start, end) of each non-overlapping mention of `terms` (labels) in `text`, longest spelling
    first, so "liver cancer" is one mention and not also "liver". Case-insensitive; English spellings
    match whole words."""
    low = text.lower()
    found: list[tuple[str, int, int]] = []
    taken = [False] * len(low)
    for spelling, term in _spelling_pairs(frozenset(terms)):
        if spelling not in low:  # a substring test first: most of a label space is absent from a text
            continue
        for m in _spelling_pattern(spelling).finditer(low):
            if not any(taken[m.start() : m.end()]):
                found.append((term, m.start(), m.end()))
                for i in range(m.start(), m.end()):
                    taken[i] = True
    return sorted(found, key=lambda f: f[1])


def _clause_bounds(text: str, start: int, end: int) -> tuple[int, int]:
    left = max((m.end() for m in _CLAUSE.finditer(text, 0, start)), default=0)
    right = next((m.start() for m in _CLAUSE.finditer(text, end)), len(text))
    return left, right


def negated(text: str, start: int, end: int) -> bool:
    """Whether the mention text[start:end] is denied within its clause ("no effusion", "effusion is not
    seen", "未见胸腔积液")."""
    left, right = _clause_bounds(text, start, end)
    return bool(_NEG_BEFORE.search(text[left:start]) or _NEG_AFTER.search(text[end:right]))


# What joins the members of one list of labels: "no cyst, nodule or mass" denies all three.
_LIST_JOIN = re.compile(r"\s*(?:[,，、]\s*)?(?:(?:and|or|nor)\b|和|或|及|与)?\s*", re.IGNORECASE)


def assertions(text: str, terms: Iterable[str]) -> tuple[set[str], set[str]]:
    """(terms asserted present, terms mentioned only as absent) in `text`. A list of labels shares its
    negation ("No cyst, colon mucosa or nodule is seen"), and negation cues are looked for with every
    mention blanked out, so a label's own characters (the 不 of 肺不张, atelectasis) never deny the next."""
    found = mentions(text, terms)
    chars = list(text)
    for _, s, e in found:
        chars[s:e] = "_" * (e - s)
    masked = "".join(chars)
    groups: list[list[tuple[str, int, int]]] = []
    for m in found:
        if groups and _LIST_JOIN.fullmatch(text, groups[-1][-1][2], m[1]):
            groups[-1].append(m)
        else:
            groups.append([m])
    present, absent = set(), set()
    for g in groups:
        denied = negated(masked, g[0][1], g[0][2]) or negated(masked, g[-1][1], g[-1][2])
        (absent if denied else present).update(term for term, _, _ in g)
    return present, absent - present


def _replies(sample: dict) -> list[str]:
    return [t.get("value", "") for t in sample.get("conversations", []) if t.get("from") == "gpt"]


def _questions(sample: dict) -> list[str]:
    return [t.get("value", "") for t in sample.get("conversations", []) if t.get("from") == "human"]


def _schema_ok(sample: dict) -> bool:
    conv = sample.get("conversations")
    if not isinstance(sample.get("id"), str) or not isinstance(conv, list) or len(conv) < 2 or len(conv) % 2:
        return False
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict) or set(turn) != {"from", "value"}:
            return False
        if (
            turn["from"] != ("human", "gpt")[i % 2]
            or not isinstance(turn["value"], str)
            or not turn["value"].strip()
        ):
            return False
    fmt, lang = sample.get("format"), sample.get("lang")
    if fmt not in FORMATS or lang not in LANGS or not isinstance(sample.get("provenance"), dict):
        return False
    if (fmt == "text") == isinstance(sample.get("image"), str):
        return False
    if fmt == "perception" and not (
        isinstance(sample.get("options"), list) and isinstance(sample.get("answer"), str)
    ):
        return False
    if fmt == "region" and not (isinstance(sample.get("box"), list) and len(sample["box"]) == 4):
        return False
    return lang == "en" or isinstance(sample.get("pair_id"), str)


def _image_token_ok(sample: dict) -> bool:
    conv = sample["conversations"]
    total = sum(t["value"].count(IMAGE_TOKEN) for t in conv)
    if sample["format"] == "text":
        return total == 0
    return total == 1 and conv[0]["value"].startswith(IMAGE_TOKEN)


def _labels_ok(sample: dict, facts: FactSheet) -> tuple[bool, bool]:
    """(required labels mentioned, no verified-absent label asserted present)."""
    text = "\n".join(_replies(sample))
    terms = set(facts.label_space) | set(facts.labels)
    present, _ = assertions(text, terms)
    fmt = sample["format"]
    if fmt in ("caption",):
        required = set(facts.labels)
    elif fmt in ("dialogue", "instruction"):
        required = set(facts.labels[:1]) if not (present & set(facts.labels)) else set()
    elif fmt == "region":
        wanted = [label for label, box in facts.boxes if list(box) == list(sample.get("box") or [])]
        required = set(wanted[:1]) if not (present & set(wanted)) else set()
    else:
        required = set()
    return required <= present, not (present & set(facts.negatives))


def _location_ok(sample: dict, facts: FactSheet) -> bool:
    """Patient side, image quadrant and vertical position stated next to a label agree with its mask
    region (or, without a mask, its only box); no patient side where the image defines none."""
    known = {label for label, _ in facts.boxes} | {r.label for r in facts.regions}
    for reply in _replies(sample):
        for sentence in _SENTENCE.split(reply):
            found = mentions(sentence, known | set(facts.label_space))
            if not found:
                continue
            # The label's own words ("Left Kidney") are not a location statement: blank them.
            blank = list(sentence)
            for _, s, e in found:
                blank[s:e] = " " * (e - s)
            rest = "".join(blank)
            sides = [
                _ZH_SIDE.get(next(g for g in m.groups() if g)) or next(g for g in m.groups() if g).lower()
                for m in _SIDE.finditer(rest)
            ]
            quads = [
                (_ZH_QUADRANT.get(m.group(3)) if m.group(3) else f"{m.group(1)} {m.group(2)}".lower())
                for m in _QUADRANT.finditer(rest)
            ]
            verts = [
                (_ZH_VERTICAL[m.group(2)] if m.group(2) else m.group(1).lower())
                for m in _VERTICAL.finditer(rest)
            ]
            if sides and facts.convention is None:
                return False
            options = [_where(facts, t) for t in dict.fromkeys(t for t, _, _ in found)]
            options = [o for o in options if o is not None]
            if not options:
                continue
            for value, key in [(s, 0) for s in sides] + [(q, 1) for q in quads] + [(v, 2) for v in verts]:
                if all(o[key] is not None and o[key] != value for o in options):
                    return False
    return True


def _where(facts: FactSheet, label: str) -> tuple[str | None, str, str] | None:
    r = facts.region(label)
    if r is not None:
        return r.side, r.quadrant, r.vertical
    boxes = [b for lab, b in facts.boxes if lab == label]
    if len(boxes) != 1:
        return None
    x0, y0, x1, y1 = boxes[0]
    cx, cy = (x0 + x1) / 2000, (y0 + y1) / 2000
    return side_of(cx, facts.convention), quadrant_of(cx, cy), vertical_of(cy)


def _boxes_ok(sample: dict, facts: FactSheet) -> bool:
    known = {tuple(b) for _, b in facts.boxes}
    for turn in sample["conversations"]:
        for m in _BOX.finditer(turn["value"]):
            if tuple(int(v) for v in m.groups()) not in known:
                return False
    if sample["format"] == "region":
        box = tuple(int(v) for v in sample["box"])
        return box in known and format_box(box) in sample["conversations"][0]["value"]
    return True


def _mc_ok(sample: dict) -> bool:
    opts, answer = sample["options"], sample["answer"]
    if not 2 <= len(opts) <= len(OPTION_LETTERS) or not all(isinstance(o, str) and o.strip() for o in opts):
        return False
    if len({o.strip().lower() for o in opts}) != len(opts):
        return False
    letters = OPTION_LETTERS[: len(opts)]
    if answer not in letters or len(sample["conversations"]) != 2:
        return False
    question, reply = (t["value"] for t in sample["conversations"])
    if any(f"\n{k}. {o}\n" not in question + "\n" for k, o in zip(letters, opts)):
        return False
    gold = opts[letters.index(answer)]
    return reply.strip() in (mc_answer(answer, gold), f"{answer}. {gold}", answer)


def _leak_free(sample: dict) -> bool:
    text = "\n".join(_replies(sample)).lower()
    return not any(p in text for p in LEAK_PHRASES)


def _length_ok(sample: dict) -> bool:
    lo, hi = LENGTH_BOUNDS[sample["format"]]
    if sample["lang"] == "zh":
        lo = max(1, lo // 2)
    n = sum(len(r.strip()) for r in _replies(sample))
    return lo <= n <= hi and all(len(q) <= MAX_QUESTION_CHARS for q in _questions(sample))


def _language_ok(sample: dict) -> bool:
    text = "\n".join(t["value"] for t in sample["conversations"]).replace(MC_INSTRUCTION, " ")
    letters = len(_LETTER.findall(_NON_WORDS.sub(" ", text)))
    if sample["lang"] == "zh":
        cjk = len(_CJK.findall(text))
        # Chinese replies keep Latin option letters, modality names and untranslated labels; enough
        # Chinese characters, or a language-ID verdict of zh, makes the text Chinese.
        return cjk >= max(2, 0.3 * letters) or lang_of(text)[0] == "zh"
    if letters < MIN_LANG_CHARS:
        return True
    return lang_of(text)[0] == "en"


def _tokens(sample: dict) -> tuple[list[str], list[str]]:
    text = "\n".join(t["value"] for t in sample["conversations"])
    boxes = sorted(m.group(0).replace(" ", "") for m in _BOX.finditer(text))
    numbers = sorted(_NUMBER.findall(_BOX.sub(" ", text)))
    return boxes, numbers


def _zh_matches(sample: dict, original: dict) -> bool:
    """A Chinese sample keeps its English original's box tokens, numbers, option count, answer letter
    and box."""
    if sample.get("pair_id") != original.get("id"):
        return False
    for key in ("answer", "box"):
        if sample.get(key) != original.get(key):
            return False
    if len(sample.get("options") or []) != len(original.get("options") or []):
        return False
    return _tokens(sample) == _tokens(original)


def _text_rules(sample: dict, original: dict | None) -> list[str]:
    """The rules on the text alone, for 2D and volume samples alike."""
    reasons = []
    if not _leak_free(sample):
        reasons.append("leak phrase")
    if not _length_ok(sample):
        reasons.append("length")
    if not _language_ok(sample):
        reasons.append("language")
    if sample["lang"] == "zh" and original is not None and not _zh_matches(sample, original):
        reasons.append("zh mismatch")
    return reasons


def validate(sample: dict, facts: FactSheet, original: dict | None = None) -> list[str]:
    """The hard rules a generated sample must pass; [] when it is valid, else the failed rules' reason
    names (`REASONS`), in that order. `original`: the English original of a Chinese sample (its
    `pair_id`); without it the "zh mismatch" rule is not checked. A sample whose schema is broken gets
    only "schema": the other rules need its parts."""
    if not _schema_ok(sample):
        return ["schema"]
    reasons = []
    if not _image_token_ok(sample):
        reasons.append("image token")
    has_labels, none_absent = _labels_ok(sample, facts)
    if not has_labels:
        reasons.append("missing label")
    if not none_absent:
        reasons.append("asserted absent")
    if not _location_ok(sample, facts):
        reasons.append("laterality")
    if not _boxes_ok(sample, facts):
        reasons.append("box mismatch")
    if sample["format"] == "perception" and not _mc_ok(sample):
        reasons.append("mc options")
    return reasons + _text_rules(sample, original)


def _volume_schema_ok(sample: dict) -> bool:
    """The 2D schema, with a stored volume (`volume`) for an image and 6-number 3D boxes."""
    flat = {k: v for k, v in sample.items() if k not in ("volume", "box")}
    if isinstance(sample.get("volume"), str):
        flat["image"] = sample["volume"]
    if sample.get("format") == "region":
        box = sample.get("box")
        if not (isinstance(box, list) and len(box) == 6):
            return False
        flat["box"] = box[:4]
    return _schema_ok(flat)


def _volume_facts_ok(sample: dict, facts) -> bool:
    """An English multiple-choice sample's gold agrees with the volume's facts; a 3D box is one of its
    boxes and is in the question; a side stated next to a label is that label's side."""
    from medvl.volume_facts import SIDES

    fmt = sample["format"]
    if fmt == "perception" and sample["lang"] == "en":
        kind, _, x = str(sample.get("kind", "")).partition(":")
        opts, letter = sample["options"], sample["answer"]
        gold = opts[OPTION_LETTERS.index(letter)]
        f = facts.labels.get(x)
        if kind == "organ":
            return gold in facts.labels and all(o in facts.absent for o in opts if o != gold)
        if kind == "presence":
            return gold == ("yes" if x in facts.labels else "no") and (x in facts.labels or x in facts.absent)
        if kind in ("side", "third", "size"):
            return f is not None and gold == getattr(f, kind)
        if kind == "plane":
            return gold == sample.get("plane")
        return False
    if fmt == "region":
        from medvl.volume_facts import box_3d, format_box_3d

        known = [box_3d(b, facts.shape) for b in facts.boxes]
        return sample["box"] in known and format_box_3d(sample["box"]) in sample["conversations"][0]["value"]
    if sample["lang"] == "en":
        for reply in _replies(sample):
            for sentence in _SENTENCE.split(reply):
                named = [t for t, _, _ in mentions(sentence, facts.labels)]
                stated = [s for s in SIDES if s in sentence]
                if len(named) == 1 and stated and stated != [facts.labels[named[0]].side]:
                    return False
    return True


def validate_volume(sample: dict, facts, original: dict | None = None) -> list[str]:
    """:func:`validate` for a sample of a volume record (`facts`: `medvl.volume_facts.VolumeFacts`):
    schema, image token, every present label in a caption, no verified-absent label asserted, the
    multiple-choice gold, side and 3D box against the facts ("laterality" / "mc options" / "box
    mismatch"), leak phrases, length, language, and a Chinese sample's letters and numbers."""
    if not _volume_schema_ok(sample):
        return ["schema"]
    reasons = []
    if not _image_token_ok(sample):
        reasons.append("image token")
    present, _ = assertions("\n".join(_replies(sample)), set(facts.label_space) | set(facts.labels))
    if sample["format"] == "caption" and not set(facts.labels) <= present:
        reasons.append("missing label")
    if present & set(facts.absent):
        reasons.append("asserted absent")
    facts_ok = _volume_facts_ok(sample, facts)
    if not facts_ok and sample["format"] not in ("perception", "region"):
        reasons.append("laterality")
    if sample["format"] == "region" and not facts_ok:
        reasons.append("box mismatch")
    if sample["format"] == "perception" and not (_mc_ok(sample) and facts_ok):
        reasons.append("mc options")
    return reasons + _text_rules(sample, original)


# ----------------------------------------------------------------------------------- benchmark files

TSV_COLUMNS = ("index", "image", "question", "A", "B", "C", "D", "answer", "category")


def write_vlmeval_tsv(rows: list[dict], root: str | Path, path: str | Path) -> Path:
    """Write ``rows`` as a VLMEvalKit TSV; ``image`` becomes the base64 of the PNG file under ``root``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        f.write("\t".join(TSV_COLUMNS) + "\n")
        for row in rows:
            vals = dict(row, image=base64.b64encode((Path(root) / row["image"]).read_bytes()).decode("ascii"))
            cells = [str(vals.get(c, "")) for c in TSV_COLUMNS]
            if any(("\t" in c or "\n" in c) for c in cells):
                raise ValueError(f"tab or newline in benchmark row {row['index']}")
            f.write("\t".join(cells) + "\n")
    return path
