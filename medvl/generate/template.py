"""The `template` backend: bilingual (English, Simplified Chinese) templates driven only by a fact sheet.

Offline and deterministic: every choice (phrasing, which box, the instruction type, the number of dialogue
turns, the multiple-choice question, its distractors and the gold letter) is drawn from the generator the
pipeline passes, seeded by (run seed, record id, format). Every phrasing is an (English, Chinese) pair
picked by one draw, so the Chinese sample of a record says the same things, with the same option letters,
numbers and boxes, as the English one. It serves any curated record: organs and findings with boxes and
masks (SLAKE), cell boxes (BCCD), image-level classes (BreastMNIST), volume slices and synthetic images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medvl.prompts import BOX_HINT, build_prompt, format_box, lettered, mc_answer, with_image
from medvl.samples import FactSheet, quadrant_of, side_of, vertical_of, zh
from medvl.vocab import BODY_REGIONS, MODALITIES

from .backend import Backend

PROMPT_VERSION = "template-1"
Pair = tuple[str, str]  # (English, Chinese)

# Perception: four options (OmniMedVQA's layout); distractors tried hardest first.
N_OPTIONS = 4
# Modalities that look alike, the hard distractors of a modality question: grey-scale radiology, colour
# photographs of a surface, stained or magnified cells, retinal scans.
LOOKALIKE_MODALITIES: tuple[tuple[str, ...], ...] = (
    ("CT", "MR", "X-ray", "Ultrasound", "PET"),
    ("Fundus photography", "Dermoscopy", "Endoscopy", "Colposcopy"),
    ("Histopathology", "Microscopy"),
    ("OCT", "Infrared reflectance imaging", "Fundus photography"),
)
HARD_MODALITY_DISTRACTORS = 2  # look-alikes (of those the job's images show) among the three distractors
NEAR_REGIONS = ("Head", "Neck", "Chest", "Abdomen", "Pelvis", "Spine")
QUADRANTS = ("upper left", "upper right", "lower left", "lower right")
ZH_QUADRANT = {"upper left": "左上", "upper right": "右上", "lower left": "左下", "lower right": "右下"}
ZH_VERTICAL = {"upper": "上", "middle": "中", "lower": "下"}
# A box overlapping another label's box by more than this share of its area could show both (a tumour
# inside the liver): that label is then not a safe distractor for "what is in this region".
MAX_DISTRACTOR_OVERLAP = 0.1
DIALOGUE_TURNS = (2, 5)  # inclusive range; the first two are always the coarse ones
MAX_LOCATED = 3  # location sentences in a caption

MODALITY_INFO: dict[str, Pair] = {
    "CT": (
        "Computed tomography reconstructs cross-sectional images from X-ray projections taken around the "
        "patient; tissue density is measured in Hounsfield units.",
        "计算机断层扫描（CT）利用围绕患者采集的X线投影重建断层图像，组织密度以亨氏单位表示。",
    ),
    "MR": (
        "Magnetic resonance imaging uses a strong magnetic field and radio waves to image soft tissue "
        "without ionising radiation.",
        "磁共振成像利用强磁场和射频脉冲对软组织成像，不使用电离辐射。",
    ),
    "X-ray": (
        "A radiograph is a projection image: dense structures such as bone attenuate X-rays and appear "
        "bright, air appears dark.",
        "X线片是一种投影图像：骨骼等致密结构衰减X线而显示为白色，空气显示为黑色。",
    ),
    "Ultrasound": (
        "Ultrasound forms images from echoes of high-frequency sound waves; it is real-time and free of "
        "ionising radiation.",
        "超声利用高频声波的回声成像，可实时检查且没有电离辐射。",
    ),
    "Microscopy": (
        "Light microscopy magnifies stained cells or tissue on a glass slide, for example a peripheral "
        "blood smear.",
        "光学显微镜放大玻片上染色的细胞或组织，例如外周血涂片。",
    ),
    "PET": (
        "Positron emission tomography images the distribution of a radioactive tracer such as FDG, "
        "showing metabolic activity.",
        "正电子发射断层扫描显示放射性示踪剂（如FDG）的分布，反映代谢活性。",
    ),
    "Histopathology": (
        "Histopathology examines stained tissue sections under a microscope to diagnose disease.",
        "组织病理学在显微镜下观察染色的组织切片以诊断疾病。",
    ),
    "Dermoscopy": (
        "Dermoscopy is magnified, illuminated photography of the skin surface used to assess pigmented "
        "lesions.",
        "皮肤镜是对皮肤表面进行放大和照明的摄影，用于评估色素性病变。",
    ),
    "Fundus photography": (
        "Fundus photography images the retina, optic disc and retinal vessels through the pupil.",
        "眼底照相通过瞳孔拍摄视网膜、视盘和视网膜血管。",
    ),
    "OCT": (
        "Optical coherence tomography uses light interference to image the retinal layers in cross-section.",
        "光学相干断层扫描利用光的干涉对视网膜各层进行断层成像。",
    ),
    "Endoscopy": (
        "Endoscopy views the inside of a hollow organ through a camera on a flexible or rigid tube.",
        "内镜通过软管或硬管上的摄像头观察空腔器官的内部。",
    ),
    "Colposcopy": (
        "Colposcopy is a magnified examination of the cervix, often after applying acetic acid.",
        "阴道镜是对宫颈的放大检查，通常在涂抹醋酸后进行。",
    ),
    "Infrared reflectance imaging": (
        "Infrared reflectance imaging records reflected near-infrared light, for example of the retina.",
        "红外反射成像记录反射的近红外光，例如视网膜成像。",
    ),
}
TASK_INFO: dict[str, Pair] = {
    "2D classification": (
        "A 2D classification dataset gives each image one or more class labels for the whole image.",
        "2D分类数据集为每张图像整体给出一个或多个类别。",
    ),
    "2D detection": (
        "A 2D detection dataset marks each object of interest with a rectangle and its class.",
        "2D检测数据集用矩形框及其类别标出每个感兴趣的目标。",
    ),
    "2D segmentation": (
        "A 2D segmentation dataset gives a pixel mask for each structure or lesion.",
        "2D分割数据集为每个结构或病灶给出像素级掩膜。",
    ),
    "3D segmentation": (
        "A 3D segmentation dataset gives a voxel mask for each structure in a volume "
        "such as a CT or MR scan.",
        "3D分割数据集为CT或磁共振等容积数据中的每个结构给出体素级掩膜。",
    ),
    "video": (
        "A video dataset labels frames or time intervals of a recording, such as an endoscopy video.",
        "视频数据集对录像（如内镜视频）的帧或时间段进行标记。",
    ),
}
ZH_CLINICAL_TASKS = {
    "Disease Diagnosis": "疾病诊断",
    "Organ Recognition": "器官识别",
    "Lesion Grading": "病变分级",
    "Attribute Recognition": "属性识别",
    "Bone Recognition": "骨骼识别",
    "Muscle Recognition": "肌肉识别",
    "Nervous Tissue Recognition": "神经组织识别",
    "Blood Vessel Recognition": "血管识别",
    "Cell Recognition": "细胞识别",
    "Microorganism Recognition": "微生物识别",
    "Counting": "计数",
    "Image Quality Grading": "图像质量分级",
    "Surgical Instrument Recognition": "手术器械识别",
    "Surgical Workflow Recognition": "手术流程识别",
}


# ---------------------------------------------------------------------------------------- phrasing


def pick(rng: np.random.Generator, pairs: Sequence[Pair], lang: str) -> str:
    """One phrasing of `pairs` in `lang`; the draw does not depend on the language."""
    return pairs[int(rng.integers(len(pairs)))][0 if lang == "en" else 1]


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def article(word: str) -> str:
    first = word.split()[0] if word else ""
    return "an" if first[:1].lower() in "aeiou" or first in ("MR", "X-ray", "OCT", "MRI") else "a"


def term(label: str, lang: str) -> str:
    """A label as written in a sentence: English lower case (abbreviations kept), Chinese by name."""
    if lang == "zh":
        return zh(label)
    return label if label.isupper() else label.lower()


def plural(label: str, n: int) -> str:
    """English count noun: "3 red blood cells", "1 platelet" (abbreviations and plurals kept)."""
    word = term(label, "en")
    return word if n == 1 or label.isupper() or word.endswith("s") else word + "s"


def the(label: str, lang: str) -> str:
    return term(label, lang) if lang == "zh" or label.isupper() else f"the {term(label, lang)}"


def join(items: Sequence[str], lang: str, word: str = "and") -> str:
    if lang == "zh":
        return (
            "、".join(items[:-1]) + ("和" if word == "and" else "或") + items[-1]
            if len(items) > 1
            else items[0]
        )
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + f" {word} " + items[-1]


def image_kind(facts: FactSheet, lang: str) -> str:
    """ "a CT image of the abdomen" / "腹部CT图像"."""
    m = facts.modality
    if lang == "zh":
        return f"{zh(facts.body_region)}{zh(m)}图像" if facts.body_region else f"{zh(m)}图像"
    name = m if m.isupper() or m in ("X-ray",) else m.lower()  # "CT", "X-ray"; "microscopy"
    where = f" of the {facts.body_region.lower()}" if facts.body_region else ""
    where = " of cells" if facts.body_region == "Cell" else where
    return f"{article(name)} {name} image{where}"


def counted(facts: FactSheet) -> bool:
    """Whether the labels are better told as counts (cells on a smear) than as structures."""
    return facts.clinical_task in ("Cell Recognition", "Counting")


def findings(facts: FactSheet, lang: str) -> str:
    """One sentence naming every positive label ("" when the record has none)."""
    if not facts.labels:
        return ""
    if facts.task == "2D classification":
        names = join([term(x, lang) for x in facts.labels], lang)
        return f"该图像的分类为{names}。" if lang == "zh" else f"The image is classified as {names}."
    counts = facts.counts()
    if counted(facts):
        items = [
            f"{counts.get(x, 1)}个{term(x, lang)}"
            if lang == "zh"
            else f"{counts.get(x, 1)} {plural(x, counts.get(x, 1))}"
            for x in facts.labels
        ]
    else:
        items = [the(x, lang) for x in facts.labels]
    return f"图中可见{join(items, lang)}。" if lang == "zh" else f"It shows {join(items, lang)}."


def where(
    facts: FactSheet, label: str, box: Sequence[int] | None = None
) -> tuple[str | None, str, str] | None:
    """(patient side, image quadrant, vertical third) of a label: its mask region, else `box` or its only
    box; None when neither tells."""
    r = facts.region(label)
    if r is not None:
        return r.side, r.quadrant, r.vertical
    if box is None:
        boxes = [b for lab, b in facts.boxes if lab == label]
        if len(boxes) != 1:
            return None
        box = boxes[0]
    cx, cy = (box[0] + box[2]) / 2000, (box[1] + box[3]) / 2000
    return side_of(cx, facts.convention), quadrant_of(cx, cy), vertical_of(cy)


def located(facts: FactSheet) -> list[str]:
    return [x for x in dict.fromkeys(facts.labels) if where(facts, x) is not None]


def location(facts: FactSheet, label: str, lang: str, box: Sequence[int] | None = None) -> str:
    """ "The liver lies on the patient's right side, in the upper left of the image, covering 12.3% of it."
    ("" when nothing is known)."""
    w = where(facts, label, box)
    if w is None:
        return ""
    side, quadrant, _ = w
    r = facts.region(label)
    share = f"{100 * r.area_share:.1f}" if r is not None else None
    if lang == "zh":
        s = {"left": "位于患者左侧，", "right": "位于患者右侧，", "midline": "位于中线附近，"}.get(
            side or "", ""
        )
        text = f"{term(label, lang)}{s}在图像{ZH_QUADRANT[quadrant]}区域"
        return text + (f"，约占图像面积的{share}%。" if share else "。")
    s = {
        "left": "on the patient's left side, ",
        "right": "on the patient's right side, ",
        "midline": "near the midline, ",
    }
    text = f"{cap(the(label, lang))} lies {s.get(side or '', '')}in the {quadrant} of the image"
    return text + (f", covering about {share}% of it." if share else ".")


def absent_sentence(facts: FactSheet, labels: Sequence[str], lang: str) -> str:
    """The verified negatives: not seen (structures, findings) or not the class (image-level classes)."""
    names = join([term(x, lang) for x in labels], lang, "or")
    if facts.task == "2D classification":
        return f"该图像不属于{names}。" if lang == "zh" else f"It is not classified as {names}."
    return f"未见{names}。" if lang == "zh" else f"No {names} is seen."


def sample(turns: Sequence[Pair], with_img: bool = True, **extra) -> dict:
    conv = []
    for i, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": with_image(q) if (i == 0 and with_img) else q})
        conv.append({"from": "gpt", "value": a})
    return {"conversations": conv, **extra}


def choose(rng: np.random.Generator, items: Sequence, k: int) -> list:
    """k items of `items` in random order (all when fewer)."""
    return [items[int(i)] for i in rng.permutation(len(items))[:k]]


# ----------------------------------------------------------------------------------------- formats

CAPTION_PROMPTS: tuple[Pair, ...] = (
    ("Describe this image.", "请描述这张图像。"),
    ("What does this image show?", "这张图像显示了什么？"),
    ("Write a short caption for this medical image.", "请为这张医学图像写一段简短的说明。"),
    ("Give a brief description of the image.", "请简要描述该图像。"),
)
OPENINGS: tuple[Pair, ...] = (
    ("This is {kind}.", "这是一张{kind}。"),
    ("The image is {kind}.", "该图像为{kind}。"),
)


def opening(facts: FactSheet, lang: str, rng: np.random.Generator) -> str:
    text = pick(rng, OPENINGS, lang).format(kind=image_kind(facts, lang))
    return text


def caption(facts: FactSheet, lang: str, rng: np.random.Generator) -> list[dict]:
    prompt = pick(rng, CAPTION_PROMPTS, lang)
    parts = [opening(facts, lang, rng), findings(facts, lang)]
    parts += [location(facts, x, lang) for x in choose(rng, located(facts), MAX_LOCATED)]
    if facts.negatives:
        parts.append(absent_sentence(facts, choose(rng, facts.negatives, 2), lang))
    return [sample([(prompt, (" " if lang == "en" else "").join(p for p in parts if p))])]


REGION_PROMPTS: tuple[Pair, ...] = (
    ("What is shown in the region {box}?", "图像区域{box}中显示的是什么？"),
    ("Describe the region {box} of this image.", "请描述图像中{box}区域的内容。"),
    ("What structure or finding lies within {box}?", "{box}范围内是什么结构或病变？"),
)


def region(facts: FactSheet, lang: str, rng: np.random.Generator) -> list[dict]:
    if not facts.boxes:
        return []
    label, box = facts.boxes[int(rng.integers(len(facts.boxes)))]
    b = format_box(box)
    q = pick(rng, REGION_PROMPTS, lang).format(box=b)
    if lang == "zh":
        a = f"区域{b}显示的是{term(label, lang)}。"
    else:
        a = f"The region {b} shows {the(label, lang)}."
    loc = location(facts, label, lang, box)
    return [sample([(q, a + ("" if not loc else (" " if lang == "en" else "") + loc))], box=list(box))]


INSTRUCTIONS: dict[str, tuple[Pair, ...]] = {
    "explain": (
        ("Explain what this image shows.", "请解释这张图像显示的内容。"),
        ("Walk me through the findings in this image.", "请逐一说明这张图像中的所见。"),
    ),
    "report": (
        ("Write a short report-style description of this image.", "请以报告的形式简要描述这张图像。"),
        ("Draft the findings and impression for this image.", "请为这张图像撰写所见和印象。"),
    ),
    "differential": (
        (
            "Which findings are present in this image, and which were considered but are not seen?",
            "这张图像中有哪些所见？哪些被考虑过但未见？",
        ),
    ),
    "compare": (
        ("Compare the positions of the {a} and the {b} in this image.", "请比较图像中{a}和{b}的位置。"),
    ),
    "count": (
        ("Count each type of cell in this image.", "请统计图像中每种细胞的数量。"),
        ("How many of each type of cell are in this image?", "图像中每类细胞各有多少个？"),
    ),
    "locate": (
        ("Where is the {a} in this image?", "图像中的{a}位于哪里？"),
        ("Describe the location of the {a}.", "请描述{a}的位置。"),
    ),
}


def instruction_types(facts: FactSheet) -> list[str]:
    """The instruction types this record supports (sampled in code, never by a writer)."""
    kinds = ["explain", "report"]
    if facts.labels and facts.negatives:
        kinds.append("differential")
    if len(located(facts)) >= 2:
        kinds.append("compare")
    if facts.boxes and counted(facts):
        kinds.append("count")
    if located(facts):
        kinds.append("locate")
    return kinds


def instruction(facts: FactSheet, lang: str, rng: np.random.Generator) -> list[dict]:
    kinds = instruction_types(facts)
    kind = kinds[int(rng.integers(len(kinds)))]
    sep = " " if lang == "en" else ""
    picked: list[str] = []
    if kind in ("compare", "locate"):
        picked = choose(rng, located(facts), 2 if kind == "compare" else 1)
    names = {k: term(x, lang) for k, x in zip("ab", picked)}
    q = pick(rng, INSTRUCTIONS[kind], lang).format(**names)
    if kind == "explain":
        parts = [opening(facts, lang, rng), findings(facts, lang)]
        parts += [location(facts, x, lang) for x in choose(rng, located(facts), 1)]
    elif kind == "report":
        head = (
            ("检查：", "所见：", "印象：") if lang == "zh" else ("Technique: ", "Findings: ", "Impression: ")
        )
        impression = (
            (
                f"{join([term(x, lang) for x in facts.labels[:2]], lang)}。"
                if lang == "zh"
                else f"{cap(join([term(x, lang) for x in facts.labels[:2]], lang))}."
            )
            if facts.labels
            else ("无特殊。" if lang == "zh" else "Unremarkable for the structures shown.")
        )
        body = sep.join(
            p for p in [findings(facts, lang), *(location(facts, x, lang) for x in located(facts)[:2])] if p
        )
        technique = f"{image_kind(facts, lang)}。" if lang == "zh" else f"{cap(image_kind(facts, lang))}."
        parts = [
            head[0] + technique,
            head[1] + (body or ("见图。" if lang == "zh" else "See image.")),
            head[2] + impression,
        ]
        return [sample([(q, "\n".join(parts))])]
    elif kind == "differential":
        parts = [findings(facts, lang), absent_sentence(facts, choose(rng, facts.negatives, 3), lang)]
    elif kind == "compare":
        parts = [location(facts, x, lang) for x in picked]
    elif kind == "count":
        parts = [findings(facts, lang)]
    else:  # locate
        parts = [location(facts, picked[0], lang)]
    return [sample([(q, sep.join(p for p in parts if p))])]


DIALOGUE_OPEN: tuple[Pair, ...] = (
    ("What kind of image is this?", "这是什么类型的图像？"),
    ("What are we looking at?", "我们看到的是什么图像？"),
)
DIALOGUE_SEEN: tuple[Pair, ...] = (
    ("What can be seen in it?", "图中能看到什么？"),
    ("Which structures or findings are visible?", "可以看到哪些结构或病变？"),
)


def dialogue(facts: FactSheet, lang: str, rng: np.random.Generator) -> list[dict]:
    """Coarse to specific: the kind of image, then what it shows, then specifics (a location, a box, a
    count, the department), and at most one turn about a verified absent finding, last."""
    turns: list[Pair] = [(pick(rng, DIALOGUE_OPEN, lang), opening(facts, lang, rng))]
    if facts.labels:
        turns.append((pick(rng, DIALOGUE_SEEN, lang), findings(facts, lang)))
    specific: list[Pair] = []
    for x in choose(rng, located(facts), 2):
        specific.append(
            (
                f"{term(x, lang)}在哪里？" if lang == "zh" else f"Where is {the(x, lang)}?",
                location(facts, x, lang),
            )
        )
    single = [(x, b) for x, b in facts.boxes if sum(lab == x for lab, _ in facts.boxes) == 1]
    if single:
        x, b = single[int(rng.integers(len(single)))]
        q = (
            f"请给出{term(x, lang)}的位置，格式为{BOX_HINT}。"
            if lang == "zh"
            else f"Give the location of {the(x, lang)} as {BOX_HINT}."
        )
        specific.append((q, format_box(b)))
    if facts.department:
        dep = zh(facts.department) if lang == "zh" else facts.department
        specific.append(
            ("通常由哪个科室解读这类图像？", f"通常由{dep}解读。")
            if lang == "zh"
            else ("Which department usually reads such images?", f"Usually {dep}.")
        )
    specific = choose(rng, specific, len(specific))
    low, high = DIALOGUE_TURNS
    n = int(rng.integers(low, high + 1))
    absent = (
        facts.negatives[int(rng.integers(len(facts.negatives)))]
        if facts.negatives and rng.random() < 0.5
        else None
    )
    room = max(0, n - len(turns) - (absent is not None))
    turns += specific[:room]
    if absent is not None:
        name = term(absent, lang)
        turns.append(
            (f"图中有{name}吗？", f"没有，未见{name}。")
            if lang == "zh"
            else (f"Is there any {name}?", f"No, there is no {name}.")
        )
    return [sample(turns)]


PERCEPTION_QUESTIONS: dict[str, tuple[Pair, ...]] = {
    "modality": (
        ("Which imaging modality was used to acquire this image?", "这张图像是用哪种成像方式获得的？"),
        ("What type of medical imaging is this?", "这是哪种医学影像？"),
    ),
    "body region": (("Which body region does this image show?", "这张图像显示的是哪个身体部位？"),),
    "present": (
        ("Which of the following is present in this image?", "下列哪一项出现在这张图像中？"),
        ("Which of these structures or findings can be seen?", "以下哪一项可以在图中看到？"),
    ),
    # "present" questions by the clinical task of the labels offered
    "Disease Diagnosis": (
        ("Which finding is present in this image?", "这张图像中存在下列哪种病变？"),
        ("Which abnormality can be seen in this image?", "图中可见下列哪种异常？"),
    ),
    "Organ Recognition": (
        ("Which organ or structure is shown in this image?", "这张图像显示的是哪个器官或结构？"),
        ("Which anatomical structure can be seen here?", "图中可见下列哪个解剖结构？"),
    ),
    "Lesion Grading": (("What is the grade of the lesion in this image?", "图中病变的分级是多少？"),),
    "box label": (("What lies in the region {box}?", "区域{box}中是什么？"),),
    "quadrant": (("In which part of the image is the {a}?", "{a}位于图像的哪个区域？"),),
    "count": (("How many {a} are in this image?", "图中有多少个{a}？"),),
}


def _overlap(a: Sequence[int], b: Sequence[int]) -> float:
    """Intersection of a and b as a share of a's area."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    area = max(1, (a[2] - a[0]) * (a[3] - a[1]))
    return max(0, w) * max(0, h) / area


def label_groups(facts: FactSheet) -> list[tuple[str, list[str], list[str]]]:
    """(clinical task, positives, verified negatives) for each task of the record's positives that has a
    negative: an organ's distractors are other organs, a grade's other grades (one group "" when the
    source gives no tasks)."""
    out = []
    for g in dict.fromkeys(facts.groups.get(x, "") for x in facts.labels):
        negatives = [x for x in facts.negatives if facts.groups.get(x, "") == g]
        if negatives:
            out.append((g, [x for x in facts.labels if facts.groups.get(x, "") == g], negatives))
    return out


def perception_items(facts: FactSheet, rng: np.random.Generator) -> dict[str, tuple[str, list[str], dict]]:
    """Multiple-choice items this record supports: kind -> (gold, distractors hardest first, format
    fields). Code picks the gold and the distractors: the gold is a fact of the sheet, every distractor
    is known to be wrong for this image."""
    items: dict[str, tuple[str, list[str], dict]] = {}
    if facts.modality:
        m = facts.modality
        # Distractors the job's own images show come first: an option that no training image ever shows
        # is one a model learns to rule out without looking, and a benchmark whose options are all real
        # (the quickstart's six modalities, SLAKE's CT, MR and X-ray) then asks what training never did.
        seen = [x for x in dict.fromkeys(facts.run_modalities) if x != m]
        lookalike = [x for x in dict.fromkeys(x for g in LOOKALIKE_MODALITIES if m in g for x in g) if x != m]
        near = choose(rng, [x for x in lookalike if x in seen], HARD_MODALITY_DISTRACTORS)
        seen_rest = [x for x in seen if x not in near]
        unseen_near = [x for x in lookalike if x not in seen]
        rest = [x for x in MODALITIES if x != m and x not in seen and x not in unseen_near]
        pool = near + choose(rng, seen_rest, len(seen_rest))
        pool += choose(rng, unseen_near, len(unseen_near)) + choose(rng, rest, len(rest))
        items["modality"] = (m, pool, {})
    if facts.body_region:
        r = facts.body_region
        seen = [x for x in dict.fromkeys(facts.run_regions) if x != r]
        rest = [x for x in NEAR_REGIONS if x != r and x not in seen]
        items["body region"] = (r, choose(rng, seen, len(seen)) + choose(rng, rest, len(rest)), {})
    for group, positives, negatives in label_groups(facts):
        gold = positives[int(rng.integers(len(positives)))]
        items[f"present:{group}"] = (gold, choose(rng, negatives, len(negatives)), {"group": group})
    boxes = [(x, b) for x, b in facts.boxes if sum(lab == x for lab, _ in facts.boxes) == 1]
    if boxes:
        gold, box = boxes[int(rng.integers(len(boxes)))]
        others = [x for x, b in facts.boxes if x != gold and _overlap(box, b) <= MAX_DISTRACTOR_OVERLAP]
        others = [
            x
            for x in dict.fromkeys(others)
            if all(_overlap(box, b) <= MAX_DISTRACTOR_OVERLAP for lab, b in facts.boxes if lab == x)
        ]
        pool = choose(rng, others, len(others)) + choose(rng, facts.negatives, len(facts.negatives))
        if pool:
            items["box label"] = (gold, pool, {"box": format_box(box)})
    spots = located(facts)
    if spots:
        x = spots[int(rng.integers(len(spots)))]
        quadrant = where(facts, x)[1]  # type: ignore[index]
        items["quadrant"] = (quadrant, choose(rng, [q for q in QUADRANTS if q != quadrant], 3), {"a": x})
    if facts.boxes and counted(facts):
        counts = facts.counts()
        x = list(counts)[int(rng.integers(len(counts)))]
        n = counts[x]
        near = [str(v) for v in (n + 1, n - 1, n + 2, n - 2, n + 3) if v >= 0]
        items["count"] = (str(n), near, {"a": x})
    return items


def base_kind(kind: str) -> str:
    """The kind of a perception item without its clinical task: "present:Organ Recognition" -> "present"."""
    return kind.split(":")[0]


def option_text(kind: str, value: str, lang: str) -> str:
    if lang == "en":
        return (
            value
            if kind in ("quadrant", "count") or value in MODALITIES + BODY_REGIONS or value.isupper()
            else value.lower()
        )
    return ZH_QUADRANT.get(value, value) if kind == "quadrant" else zh(value)


def perception(facts: FactSheet, lang: str, rng: np.random.Generator) -> list[dict]:
    """One multiple-choice sample per kind of fact the record supports (modality, region, each clinical
    task's labels, box, quadrant, count), as GMAI-VL's perception data asks several things of one image."""
    out = []
    for kind, (gold, pool, fields) in perception_items(facts, rng).items():
        opts = [gold, *pool[: N_OPTIONS - 1]]
        opts = [opts[int(i)] for i in rng.permutation(len(opts))]  # the gold's letter is uniform: balanced
        letter = "ABCDEFGHI"[opts.index(gold)]
        base = base_kind(kind)
        shown = [option_text(base, o, lang) for o in opts]
        names = {k: (term(v, lang) if k == "a" else v) for k, v in fields.items()}
        if kind == "count" and lang == "en":
            names["a"] = plural(fields["a"], 2)
        questions = PERCEPTION_QUESTIONS.get(fields.get("group", ""), PERCEPTION_QUESTIONS[base])
        question = pick(rng, questions, lang).format(**names)
        options = lettered(shown)
        out.append(
            sample(
                [(build_prompt(question, options), mc_answer(letter, options[letter]))],
                options=shown,
                answer=letter,
                kind=kind,
            )
        )
    return out


def text_items(facts: FactSheet, lang: str) -> list[Pair]:
    """Knowledge question/answer pairs that follow from the sheet's vocabulary (no image needed)."""
    i = 0 if lang == "en" else 1
    out: list[Pair] = []
    if facts.modality in MODALITY_INFO:
        m = facts.modality
        q = f"什么是{zh(m)}成像？" if lang == "zh" else f"What is {m} imaging?"
        out.append((q, MODALITY_INFO[m][i]))
    if facts.task in TASK_INFO:
        q = (
            f"“{facts.task}”类数据集提供什么信息？"
            if lang == "zh"
            else f"What does a {facts.task} dataset provide?"
        )
        out.append((q, TASK_INFO[facts.task][i]))
    if facts.department and facts.body_region:
        if lang == "zh":
            q = f"{zh(facts.body_region)}的{zh(facts.modality)}图像通常由哪个科室解读？"
            a = f"通常由{zh(facts.department)}解读。"
        else:
            q = f"Which department usually reads {facts.modality} images of the {facts.body_region.lower()}?"
            a = f"Usually {facts.department}."
        out.append((q, a))
    if facts.labels and facts.clinical_task in ZH_CLINICAL_TASKS:
        x = facts.labels[0]
        if lang == "zh":
            q = f"在医学影像中识别{term(x, lang)}属于哪一类临床任务？"
            a = f"属于{ZH_CLINICAL_TASKS[facts.clinical_task]}。"
        else:
            q = f"Which clinical task does recognising {the(x, lang)} on a medical image belong to?"
            a = f"{facts.clinical_task}."
        out.append((q, a))
    return out


def text(facts: FactSheet, lang: str, rng: np.random.Generator) -> list[dict]:
    return text_sample(text_items(facts, lang), rng)


def text_sample(items: list[Pair], rng: np.random.Generator) -> list[dict]:
    """One of the knowledge items, drawn, as a text-only sample."""
    if not items:
        return []
    return [sample([items[int(rng.integers(len(items)))]], with_img=False)]


WRITERS = {
    "caption": caption,
    "region": region,
    "instruction": instruction,
    "dialogue": dialogue,
    "perception": perception,
    "text": text,
}


class TemplateBackend(Backend):
    name = "template"
    model = "template"
    prompt_version = PROMPT_VERSION
    volumes = True  # its volume writers are medvl.generate.volume's

    def write(self, facts: FactSheet, fmt: str, lang: str, rng: np.random.Generator) -> list[dict]:
        return WRITERS[fmt](facts, lang, rng)

