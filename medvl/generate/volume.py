"""3D instructions: the template backend's six formats for a curated volume record, from its facts only.

A volume record's facts (:mod:`medvl.volume_facts`: the labels present, per label its side, the third of
the slices its centre lies in, its slice range, its size grade, its 3D boxes; the labels verified absent
where the card says the annotation is exhaustive) are what every sample states. Samples name the stored
array (`"volume": "volumes/<sha256>.npy"`, copied into the output folder), which training, evaluation
and serving cut into slabs (slices route) or give whole to a 3D tower (native route); docs/3d.md.

- **caption**: modality, region, slice count, the structures present, each finding's side, slices and
  size, and up to two verified-absent findings.
- **region**: a 3D box `[x0, y0, z0, x1, y1, z1]` (0-1000 of the array's columns, rows and slices) in
  the question; the answer names its label.
- **instruction**: one of list (the structures), locate (a structure's side and slices) or describe (a
  finding's side, slices and size), drawn in code.
- **dialogue**: 2-4 short turns (region, modality, a presence, a location).
- **perception**: one multiple-choice sample per kind the facts support: organ (each present organ
  against three verified absent ones), presence (each finding of the label space, one organ), side,
  slice third, size (findings), plane (the volume turned to a drawn plane,
  :func:`medvl.volume_facts.reformat`, and written beside the others). The wording is the synthetic
  3D benchmark's (`QUESTIONS`).
- **text**: the 2D path's knowledge items for the record's modality, task and department.

Every draw comes from the pipeline's generator, so the Chinese sample of a record states the same facts
with the same letters, numbers and boxes.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from medvl.prompts import build_prompt, lettered, mc_answer
from medvl.samples import zh
from medvl.volume_facts import (
    BOX3D_HINT,
    PLANES,
    QUESTIONS,
    SIDES,
    SIZES,
    THIRDS,
    ZH_WORDS,
    VolumeFacts,
    box_3d,
    format_box_3d,
)

from .template import N_OPTIONS, Pair, choose, join, pick, sample, text_items, text_sample


def word(value: str, lang: str) -> str:
    return value if lang == "en" else ZH_WORDS.get(value, zh(value))


def label(value: str, lang: str) -> str:
    return value if lang == "en" else zh(value)


def organs(facts: VolumeFacts) -> list[str]:
    return [x for x in facts.labels if facts.is_organ(x)]


def where(facts: VolumeFacts, x: str, lang: str) -> str:
    """ "on the patient's left, centred in the middle third of the slices (slices 13-26 of 32)"."""
    f = facts.labels[x]
    depth = facts.shape[1]
    parts = []
    if lang == "en":
        if f.side:
            parts.append(f"on the {f.side}")
        if f.third:
            parts.append(f"centred in the {f.third} of the slices")
        if f.slices:
            parts.append(f"(slices {f.slices[0] + 1}-{f.slices[1]} of {depth})")
        return " ".join(parts) if parts else f"(slices {f.slices[0] + 1}-{f.slices[1]} of {depth})"
    if f.side:
        parts.append(f"位于{word(f.side, lang)}")
    if f.third:
        parts.append(f"中心在层面的{word(f.third, lang)}")
    if f.slices:
        parts.append(f"（共{depth}层中的第{f.slices[0] + 1}-{f.slices[1]}层）")
    slices = parts.pop() if f.slices else ""
    return "，".join(parts) + slices


def located_sentence(facts: VolumeFacts, x: str, lang: str) -> str:
    return (
        f"The {x} lies {where(facts, x, lang)}."
        if lang == "en"
        else f"{label(x, lang)}{where(facts, x, lang)}。"
    )


def size_phrase(facts: VolumeFacts, x: str, lang: str) -> str:
    grade = facts.labels[x].size
    if grade is None:
        return ""
    return f"It is {grade}." if lang == "en" else f"大小为{word(grade, lang)}。"


def kind_of(facts: VolumeFacts, lang: str) -> str:
    region = facts.body_region.lower() or "body"
    if lang == "en":
        return f"a {facts.modality} volume of the {region} ({facts.shape[1]} axial slices)"
    return f"{zh(facts.body_region or 'body')}{facts.modality}容积图像（{facts.shape[1]}个轴位层面）"


# ----------------------------------------------------------------------------------------- formats

CAPTION_PROMPTS: tuple[Pair, ...] = (
    ("Describe this volume.", "请描述这个容积图像。"),
    ("What does this scan show?", "这次扫描显示了什么？"),
    ("Write a short report of the structures in this volume.", "请简要写出该容积图像中的结构。"),
)


def caption(facts: VolumeFacts, lang: str, rng: np.random.Generator) -> list[dict]:
    prompt = pick(rng, CAPTION_PROMPTS, lang)
    shown = [label(x, lang) for x in facts.labels]
    if lang == "en":
        parts = [f"This is {kind_of(facts, lang)}.", f"It shows the {join(shown, lang)}." if shown else ""]
    else:
        parts = [f"这是一幅{kind_of(facts, lang)}。", f"可见{join(shown, lang)}。" if shown else ""]
    for x in facts.labels:
        if x in facts.findings:
            lead = (
                f"The {x} lies {where(facts, x, lang)}."
                if lang == "en"
                else f"{label(x, lang)}{where(facts, x, lang)}。"
            )
            parts += [lead, size_phrase(facts, x, lang)]
    absent = choose(rng, [x for x in facts.absent if x in facts.findings], 2)
    if absent:
        names = join([label(x, lang) for x in absent], lang, "or")
        parts.append(f"No {names} is seen." if lang == "en" else f"未见{names}。")
    sep = " " if lang == "en" else ""
    return [sample([(prompt, sep.join(p for p in parts if p))])]


REGION_PROMPTS: tuple[Pair, ...] = (
    ("What lies within the box {box}?", "框{box}内是什么结构？"),
    ("Which structure is in the region {box} of this volume?", "该容积图像中{box}区域是什么结构？"),
)


def region(facts: VolumeFacts, lang: str, rng: np.random.Generator) -> list[dict]:
    boxes = [b for b in facts.boxes if b["label"] in facts.labels]
    if not boxes:
        return []
    b = boxes[int(rng.integers(len(boxes)))]
    box = box_3d(b, facts.shape)
    q = pick(rng, REGION_PROMPTS, lang).format(box=format_box_3d(box))
    hint = f" Boxes are {BOX3D_HINT}." if lang == "en" else f"（坐标为{BOX3D_HINT}）"
    a = f"It is the {b['label']}." if lang == "en" else f"该区域为{label(b['label'], lang)}。"
    return [sample([(q + hint, a)], box=box)]


def instruction(facts: VolumeFacts, lang: str, rng: np.random.Generator) -> list[dict]:
    kinds = ["list"] + (["locate"] if any(f.side or f.third for f in facts.labels.values()) else [])
    finds = [x for x in facts.labels if x in facts.findings]
    kinds += ["describe"] if finds else []
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "list" and facts.labels:
        names = join([label(x, lang) for x in facts.labels], lang)
        q, a = (
            ("List the labelled structures in this volume.", f"The volume shows the {names}.")
            if lang == "en"
            else ("请列出该容积图像中标注的结构。", f"该容积图像显示{names}。")
        )
    elif kind == "locate":
        x = choose(rng, [k for k, f in facts.labels.items() if f.side or f.third], 1)[0]
        q, a = (
            f"Where is the {x} in this volume?"
            if lang == "en"
            else f"{label(x, lang)}位于该容积图像的什么位置？",
            located_sentence(facts, x, lang),
        )
    elif kind == "describe":
        x = choose(rng, finds, 1)[0]
        q, a = (
            (
                f"Describe the {x} in this volume.",
                f"The {x} lies {where(facts, x, lang)}. {size_phrase(facts, x, lang)}",
            )
            if lang == "en"
            else (
                f"请描述该容积图像中的{label(x, lang)}。",
                f"{label(x, lang)}{where(facts, x, lang)}。{size_phrase(facts, x, lang)}",
            )
        )
    else:
        return []
    return [sample([(q, a.strip())])]


def short_turns(facts: VolumeFacts, lang: str, rng: np.random.Generator) -> list[Pair]:
    region_name = facts.body_region.lower() or "body"
    turns: list[Pair] = [
        (
            ("Which body region does this volume show?", f"The {region_name}.")
            if lang == "en"
            else ("该容积图像显示哪个身体部位？", f"{zh(facts.body_region or 'body')}。")
        ),
        (
            ("What is the imaging modality?", f"{facts.modality}.")
            if lang == "en"
            else ("这是什么成像方式？", f"{facts.modality}。")
        ),
    ]
    for x in choose(rng, list(facts.labels), 2):
        yes = ("Yes.", "是。")[lang == "zh"]
        turns.append(
            (f"Is there a {x} in this volume?", yes)
            if lang == "en"
            else (f"该容积图像中有{label(x, lang)}吗？", yes)
        )
    for x in choose(rng, facts.absent, 1):
        turns.append(
            (f"Is there a {x} in this volume?", "No.")
            if lang == "en"
            else (f"该容积图像中有{label(x, lang)}吗？", "否。")
        )
    for x in choose(rng, [k for k, f in facts.labels.items() if f.side], 1):
        side = facts.labels[x].side or ""
        turns.append(
            (f"On which side of the patient is the {x}?", f"On the {side}.")
            if lang == "en"
            else (f"{label(x, lang)}位于患者的哪一侧？", f"{word(side, lang)}。")
        )
    return turns


def dialogue(facts: VolumeFacts, lang: str, rng: np.random.Generator) -> list[dict]:
    turns = short_turns(facts, lang, rng)
    n = min(len(turns), int(rng.integers(2, 5)))
    return [sample(turns[:2] + choose(rng, turns[2:], n - 2))]


def perception_items(
    facts: VolumeFacts, rng: np.random.Generator
) -> list[tuple[str, str, list[str], str, bool]]:
    """(kind, gold, options in order, the label asked about, shuffle) for every question the facts
    support; the plane question's gold is drawn here and its volume turned by the pipeline."""
    out = []
    present_organs = organs(facts)
    absent_organs = [x for x in facts.absent if facts.is_organ(x)]
    if len(absent_organs) >= N_OPTIONS - 1:
        # One question per present organ: the same volume with different golds, so that the answer is
        # the option the volume shows, not the organ most often right.
        for gold in present_organs:
            out.append(("organ", gold, [gold, *choose(rng, absent_organs, N_OPTIONS - 1)], "", True))
    asked = [x for x in facts.findings if x in facts.labels or x in facts.absent]
    organ_pool = present_organs + absent_organs
    if organ_pool:
        asked.append(organ_pool[int(rng.integers(len(organ_pool)))])
    for x in asked:
        out.append((f"presence:{x}", "yes" if x in facts.labels else "no", ["yes", "no"], x, False))
    located = [x for x in facts.labels if x in facts.findings]
    located += choose(rng, [x for x in present_organs if facts.labels[x].side], 1)
    for x in located:
        f = facts.labels[x]
        if f.side:
            out.append((f"side:{x}", f.side, list(SIDES), x, False))
        if f.third and x in facts.findings:
            out.append((f"third:{x}", f.third, list(THIRDS)[::-1], x, False))
        if f.size and x in facts.findings:
            out.append((f"size:{x}", f.size, list(SIZES), x, False))
    plane = PLANES[int(rng.integers(len(PLANES)))]
    out.append(("plane", plane, list(PLANES), "", True))
    return out


def perception(facts: VolumeFacts, lang: str, rng: np.random.Generator) -> list[dict]:
    out = []
    for kind, gold, options, x, shuffle in perception_items(facts, rng):
        opts = [options[int(i)] for i in rng.permutation(len(options))] if shuffle else options
        letter = "ABCDEFGHI"[opts.index(gold)]
        shown = [word(o, lang) for o in opts]
        question = QUESTIONS[kind.split(":")[0]][lang == "zh"].format(label=label(x, lang))
        options_map = lettered(shown)
        extra: dict = {"options": shown, "answer": letter, "kind": kind}
        if kind == "plane":
            extra["plane"] = gold
        out.append(
            sample([(build_prompt(question, options_map), mc_answer(letter, options_map[letter]))], **extra)
        )
    return out


def text(facts: VolumeFacts, lang: str, rng: np.random.Generator) -> list[dict]:
    sheet = SimpleNamespace(
        modality=facts.modality,
        task=facts.task,
        department=facts.department,
        body_region=facts.body_region,
        labels=list(facts.labels),
        clinical_task=facts.groups.get(next(iter(facts.labels), ""), ""),
    )
    return text_sample(text_items(sheet, lang), rng)  # type: ignore[arg-type]  # the fields it reads


WRITERS = {
    "caption": caption,
    "region": region,
    "instruction": instruction,
    "dialogue": dialogue,
    "perception": perception,
    "text": text,
}


def write_volume(facts: VolumeFacts, fmt: str, lang: str, rng: np.random.Generator) -> list[dict]:
    """Raw samples of one format in one language for a volume record (the template backend's)."""
    return WRITERS[fmt](facts, lang, rng)
