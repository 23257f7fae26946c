"""Dimension 5 (clinical and logical validity): an LLM judge through medvl.llm when one is configured,
else rule-based checks. Both give 0 (invalid), 1 (doubtful) or 2 (valid) with a reason.

The judge is shown the fact sheet (what the annotation says, computed in code) and the conversation
(and, with `judge_send_image`, the image), and must write a critique first and then, on its own last
line, `Score: 0|1|2`. A reply without that line is malformed: no score, so the sample fails (closed)."""

from __future__ import annotations

import json
import re

from .text import questions, replies

JUDGE_PROMPT_VERSION = "quality-judge-v1"
JUDGE_SYSTEM = """You review training data for a medical vision-language model. You get the facts an \
expert annotation gives about one medical image, and a conversation about that image written by \
someone who saw the same facts. Judge the conversation's clinical and logical validity:
- 2: every medical statement is correct, consistent with the facts and with itself, and answers \
follow from the questions;
- 1: minor problems (vague, slightly off terminology, an unsupported but plausible detail);
- 0: a clinical error, a contradiction of the facts or of itself, an unsafe statement, or an answer \
that does not fit its question.
Write a short critique first, then end with one line exactly of the form `Score: N` (N is 0, 1 or 2)."""

_SCORE = re.compile(r"^\s*\**\s*score\s*\**\s*[:：]\s*\**\s*([012])\s*\**\s*$", re.IGNORECASE | re.MULTILINE)


def judge_messages(sample: dict, facts: dict, image_url: str | None = None) -> list[dict]:
    keep = (
        "modality",
        "body_region",
        "department",
        "task",
        "clinical_task",
        "labels",
        "negatives",
        "label_space",
        "boxes",
        "regions",
        "convention",
    )
    shown = {k: facts.get(k) for k in keep if k in facts}
    conv = "\n".join(f"{t.get('from')}: {t.get('value')}" for t in sample.get("conversations") or [])
    extra = {k: sample[k] for k in ("options", "answer", "box") if k in sample}
    text = (
        f"Facts (JSON):\n{json.dumps(shown, ensure_ascii=False, sort_keys=True)}\n\n"
        f"Conversation ({sample.get('format')}, language {sample.get('lang')}):\n{conv}"
        + (f"\n\nStructured fields: {json.dumps(extra, ensure_ascii=False)}" if extra else "")
    )
    content: str | list = text
    if image_url:
        content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": text}]
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": content}]


def parse_judgement(reply: str) -> tuple[int | None, str]:
    """(score, critique) of a judge reply; score None when no `Score:` line ends it after a critique."""
    matches = list(_SCORE.finditer(reply))
    if not matches:
        return None, reply.strip()
    last = matches[-1]
    critique = reply[: last.start()].strip()
    if reply[last.end() :].strip() or not critique:
        return None, reply.strip()
    return int(last.group(1)), critique


# ------------------------------------------------------------------------------------- rules

# Words that name a modality, by vocabulary modality (English and Chinese); a reply naming another
# modality than the image's contradicts it.
MODALITY_WORDS: dict[str, tuple[str, ...]] = {
    "CT": ("ct", "computed tomography", "ct扫描"),
    "MR": ("mri", "mr", "magnetic resonance", "磁共振", "核磁"),
    "X-ray": ("x-ray", "radiograph", "x线", "x光"),
    "Ultrasound": ("ultrasound", "sonography", "sonogram", "超声"),
    "PET": ("pet",),
    "Histopathology": ("histopathology", "histology", "病理"),
    "Endoscopy": ("endoscopy", "endoscopic", "内镜"),
    "Fundus photography": ("fundus photograph", "眼底照相"),
    "Dermoscopy": ("dermoscopy", "dermoscopic", "皮肤镜"),
}
_YES = re.compile(r"^\s*(yes|yeah|是|有)\b", re.IGNORECASE)
_NO = re.compile(r"^\s*(no|not|否|没有|无)\b", re.IGNORECASE)
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s*%")


# One pattern per modality, compiled once: English words whole, Chinese ones anywhere.
_MODALITY_PATTERNS = {
    modality: re.compile(
        "|".join(
            rf"(?<![a-z0-9-]){re.escape(w)}(?![a-z0-9-])" if re.search(r"[a-z]", w) else re.escape(w)
            for w in words
        )
    )
    for modality, words in MODALITY_WORDS.items()
}


def _modality_words(text: str) -> set[str]:
    low = text.lower()
    return {modality for modality, pattern in _MODALITY_PATTERNS.items() if pattern.search(low)}


def rule_checks(sample: dict, facts: dict) -> tuple[int, str]:
    """Clinical and logical checks in code (no judge): replies about an image that name a modality
    name the image's; a yes/no answer about a label agrees with the facts (positive: yes; verified
    absent: no); no label is both affirmed and denied across the replies; no percentage above 100.
    2 when all pass, 0 with the first failure otherwise (these rules know no "doubtful")."""
    from medvl.samples import assertions, mentions

    rs = replies(sample)
    modality = facts.get("modality")
    named = set().union(*(_modality_words(r) for r in rs)) if rs else set()
    # Only a reply about an image that names another modality and never the image's own contradicts it
    # ("a CT uses X-rays" does not; text-only knowledge answers have no image to contradict).
    if sample.get("image") and modality in MODALITY_WORDS and named and modality not in named:
        return 0, f"reply names {', '.join(sorted(named))} but the image is {modality}"
    labels, negatives = set(facts.get("labels") or []), set(facts.get("negatives") or [])
    terms = set(facts.get("label_space") or []) | labels
    for q, r in zip(questions(sample), rs, strict=False):
        asked = {t for t, _, _ in mentions(q, terms)}
        if len(asked) != 1:
            continue
        (label,) = asked
        if _YES.match(r) and label in negatives:
            return 0, f"answers yes about {label!r}, which the annotation says is absent"
        if _NO.match(r) and label in labels and not re.search(r"\b(no|not)\b.*\bother\b", r.lower()):
            return 0, f"answers no about {label!r}, which the annotation says is present"
    present, absent = set(), set()
    for r in rs:
        p, a = assertions(r, terms)
        present |= p
        absent |= a
    both = sorted(present & absent)
    if both:
        return 0, f"affirms and denies {both[0]!r}"
    for r in rs:
        for m in _PERCENT.finditer(r):
            if float(m.group(1)) > 100:
                return 0, f"states an impossible {m.group(0)}"
    return 2, "rules: modality, yes/no answers, self-consistency, numbers agree"
