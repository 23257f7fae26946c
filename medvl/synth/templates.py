"""Template-based instruction data and a multiple-choice benchmark from synthetic image labels.

Deliberately small and replaceable (the model-driven generation pipeline lives in ``medvl.generate``).
Samples use the LLaVA format::

    {"id": str, "image": "images/x.png" (absent for text-only),
     "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}

Prompts, multiple-choice replies and boxes come from :mod:`medvl.prompts`, the one place that sets
the format for training, evaluation and serving alike.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np

from medvl.imaging import CT_WINDOWS as WINDOWS
from medvl.prompts import BOX_HINT, OPTION_LETTERS, box_1000, build_prompt, format_box, mc_answer, with_image
from medvl.records import read_rows
from medvl.synth.dataset import write_synthetic
from medvl.synth.images import (
    ANATOMIES,
    FINDINGS,
    GEN_MODALITIES,
    GRADE_WORDS,
    NO_FINDING,
    QUADRANTS,
    SPECS,
)
from medvl.synth.phantom import HU
from medvl.vocab import MODALITIES, OMNIMEDVQA_QUESTION_TYPES

# Four options per synthetic multiple-choice question, as in OmniMedVQA.
LETTERS = OPTION_LETTERS[:4]
GRADES = ("grade 1", "grade 2", "grade 3")
MODALITY_Q, ANATOMY_Q, DISEASE_Q, GRADE_Q, ATTRIBUTE_Q = OMNIMEDVQA_QUESTION_TYPES

QUESTIONS: dict[str, tuple[str, ...]] = {
    MODALITY_Q: (
        "What imaging modality was used to acquire this image?",
        "Which modality is shown in this image?",
        "What type of medical imaging is this?",
    ),
    ANATOMY_Q: (
        "Which anatomical structure is shown in this image?",
        "What organ or structure is the focus of this image?",
        "Which anatomy does this image show?",
    ),
    DISEASE_Q: (
        "What finding is present in this image?",
        "What is the most likely diagnosis based on this image?",
        "Which abnormality, if any, can be seen in this image?",
    ),
    GRADE_Q: (
        "What is the grade of the {finding} in this image?",
        "How would you grade the {finding} shown here?",
    ),
    ATTRIBUTE_Q: (
        "In which quadrant of the image is the {finding} located?",
        "Where in the image is the {finding}?",
    ),
}
CAPTION_PROMPTS = (
    "Describe this image.",
    "What does this image show?",
    "Give a short description of this medical image.",
    "Write a caption for this image.",
)
# Findings that are plural or mass nouns take no article.
_NO_ARTICLE = {"retinal hemorrhages", "hard exudates", "bone marrow edema"}
_COUNT_WORDS = {1: "a few", 2: "several", 3: "many"}

MODALITY_LOOKS: dict[str, str] = {
    "X-ray": "An X-ray is a grey projection radiograph: bone and soft tissue are bright, "
    "air-filled lungs are dark.",
    "CT": "A CT image is an axial cross-section on a black background, "
    "displayed through a window of Hounsfield units.",
    "MR": "An MR image shows soft tissue contrast; on T1 fat is bright, cortical bone and CSF are dark.",
    "Fundus photography": "A fundus photograph shows the orange retina in a round field "
    "with the yellow optic disc and red vessels.",
    "Dermoscopy": "A dermoscopy image is a magnified colour photograph of the skin surface "
    "and a pigmented lesion.",
    "Histopathology": "A histopathology image shows H&E-stained tissue: nuclei purple, "
    "cytoplasm and stroma pink.",
}
FINDING_LOOKS: dict[str, str] = {
    "nodule": "A nodule is a round bright opacity inside the dark lung.",
    "pleural effusion": "A pleural effusion whitens the lung base "
    "with a meniscus climbing the lateral chest wall.",
    "fracture": "A fracture is a dark line across a bone with swelling of the soft tissue around it.",
    "cyst": "A liver cyst is a round, sharply marginated, hypodense (darker than liver) lesion.",
    "mass": "A liver mass here is a round hyperdense (brighter than liver) lesion.",
    "hemorrhage": "An acute intracranial hemorrhage is hyperdense (bright) on CT in the brain window.",
    "tumor": "A contrast-enhancing brain tumor is bright on T1 after contrast; "
    "large ones have a dark necrotic core.",
    "bone marrow edema": "Bone marrow edema is a dark area inside the bright fatty marrow on T1.",
    "retinal hemorrhages": "Retinal hemorrhages are dark red blots on the retina; "
    "more blots mean a higher grade.",
    "hard exudates": "Hard exudates are bright yellow spots on the retina; more spots mean a higher grade.",
    "nevus": "A nevus is a symmetric, evenly brown lesion with a smooth, regular border.",
    "melanoma": "A melanoma is an asymmetric lesion with an irregular border "
    "and several colours: brown, black, blue-grey and red.",
    "adenocarcinoma": "Colon adenocarcinoma replaces the round glands "
    "with crowded, large, dark, pleomorphic nuclei.",
    "metastasis": "A lymph node metastasis is a sheet of large pale tumour cells "
    "among the small dark lymphocytes.",
}


def box_text(rec: dict) -> str:
    return format_box(box_1000(rec["bbox"], rec.get("width", 128), rec.get("height", 128)))


def finding_phrase(rec: dict) -> str:
    """E.g. "a medium-sized (grade 2) nodule", "many (grade 3) hard exudates", "a fracture"."""
    f, g = rec["finding"], rec["grade"]
    if f in ("retinal hemorrhages", "hard exudates") and g:
        return f"{_COUNT_WORDS[g]} (grade {g}) {f}"
    text = f"{GRADE_WORDS[g]} (grade {g}) {f}" if g else f
    return text if f in _NO_ARTICLE and not g else f"{'an' if text[0] in 'aeiou' else 'a'} {text}"


def finding_sentence(rec: dict, rng: np.random.Generator) -> str:
    if rec["finding"] == NO_FINDING:
        return str(
            rng.choice(
                ["No abnormality is seen.", "There is no finding.", "The image shows no abnormal finding."]
            )
        )
    phrase = finding_phrase(rec)
    return (
        f"There is {phrase} in the {rec['location']} of the image."
        if rng.random() < 0.5
        else (f"{phrase[0].upper()}{phrase[1:]} is seen in the {rec['location']} of the image.")
    )


def caption_text(rec: dict, rng: np.random.Generator) -> str:
    m, r, a = rec["modality"], rec["body_region"], rec["anatomy"]
    head = str(
        rng.choice(
            [
                f"A {m} image of the {r} showing the {a}.",
                f"This is a {m} image of the {r}; the {a} is shown.",
                f"{m} of the {r}, {a}.",
            ]
        )
    )
    tail = f" Department: {rec['department']}." if rng.random() < 0.3 else ""
    return f"{head} {finding_sentence(rec, rng)}{tail}"


def _sample(rec: dict, suffix: str, turns: list[tuple[str, str]]) -> dict:
    conv = []
    for i, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": with_image(q) if i == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return {"id": f"{rec['id']}_{suffix}", "image": rec["image"], "conversations": conv}


# ---------------------------------------------------------------------------------------------------
# multiple choice


def _options(rng: np.random.Generator, correct: str, pool, prefer=()) -> tuple[list[str], int]:
    """Up to 4 unique options: the answer plus distractors, preferring ``prefer`` (harder ones)."""
    pref = [p for p in dict.fromkeys(prefer) if p != correct]
    rest = [p for p in dict.fromkeys(pool) if p != correct and p not in pref]
    pref = [pref[i] for i in rng.permutation(len(pref))]
    rest = [rest[i] for i in rng.permutation(len(rest))]
    opts = [correct] + (pref + rest)[:3]
    opts = [opts[i] for i in rng.permutation(len(opts))]
    return opts, opts.index(correct)


def mc_items(rec: dict, rng: np.random.Generator) -> list[tuple[str, str, list[str], int]]:
    """All applicable (question type, question, options, answer index) for one record."""

    def q(kind: str) -> str:
        return str(rng.choice(QUESTIONS[kind])).format(finding=rec["finding"])

    items = [(MODALITY_Q, q(MODALITY_Q), *_options(rng, rec["modality"], GEN_MODALITIES))]
    items.append((ANATOMY_Q, q(ANATOMY_Q), *_options(rng, rec["anatomy"], ANATOMIES)))
    same = [f for s in SPECS[rec["modality"]].values() for f in s.findings] + [NO_FINDING]
    items.append((DISEASE_Q, q(DISEASE_Q), *_options(rng, rec["finding"], FINDINGS, same)))
    if rec["grade"]:
        opts = list(GRADES)  # in order: grades are ordinal
        items.append((GRADE_Q, q(GRADE_Q), opts, rec["grade"] - 1))
    if rec["location"]:
        items.append((ATTRIBUTE_Q, q(ATTRIBUTE_Q), *_options(rng, rec["location"], QUADRANTS)))
    return items


def mc_questions(records: list[dict], rng: np.random.Generator) -> list[dict]:
    """One single-turn LLaVA sample per record and applicable OmniMedVQA question type."""
    out = []
    for rec in records:
        for k, (kind, question, opts, ans) in enumerate(mc_items(rec, rng)):
            answer = mc_answer(LETTERS[ans], opts[ans])
            out.append(_sample(rec, f"mc{k}", [(build_prompt(question, opts), answer)]))
            out[-1]["category"] = kind
    return out


def mc_benchmark(records: list[dict], rng: np.random.Generator) -> list[dict]:
    """VLMEvalKit-style rows: index, image, question, A-D ("" when absent), answer letter, category."""
    rows = []
    for rec in records:
        for kind, question, opts, ans in mc_items(rec, rng):
            row = {"index": len(rows), "image": rec["image"], "question": question}
            row.update({LETTERS[i]: (opts[i] if i < len(opts) else "") for i in range(4)})
            row.update({"answer": LETTERS[ans], "category": kind})
            rows.append(row)
    return rows


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


# ---------------------------------------------------------------------------------------------------
# captions, regions, dialogues, text-only, LM corpus


def captions(records: list[dict], rng: np.random.Generator) -> list[dict]:
    return [_sample(r, "cap", [(str(rng.choice(CAPTION_PROMPTS)), caption_text(r, rng))]) for r in records]


def region_captions(records: list[dict], rng: np.random.Generator) -> list[dict]:
    """Region description (box -> text) or grounding (text -> box); a plain "no lesion" for normal images."""
    out = []
    for r in records:
        if r["bbox"] is None:
            q = "Is there a lesion in this image? If so, give its bounding box."
            a = f"No. This {r['modality']} image of the {r['body_region']} shows no finding."
        elif rng.random() < 0.5:
            q = f"What is shown in the region {box_text(r)}?"
            a = f"The region {box_text(r)} shows {finding_phrase(r)} in the {r['anatomy']}."
        else:
            q = f"Where is the {r['finding']} in this image? Answer with a bounding box {BOX_HINT}."
            a = box_text(r)
        out.append(_sample(r, "reg", [(q, a)]))
    return out


def dialogues(records: list[dict], rng: np.random.Generator) -> list[dict]:
    """2-3 turn conversations: modality/region, then abnormality, then grounding, grade or anatomy."""
    out = []
    for r in records:
        turns = [
            (
                str(rng.choice(["What kind of image is this?", "What are we looking at?"])),
                f"This is a {r['modality']} image of the {r['body_region']}.",
            ),
            (
                str(rng.choice(["Is there any abnormality?", "Do you see anything abnormal?"])),
                finding_sentence(r, rng),
            ),
        ]
        if rng.random() < 0.6:
            if r["bbox"] is not None and (r["grade"] is None or rng.random() < 0.5):
                turns.append((f"Give its bounding box {BOX_HINT}.", box_text(r)))
            elif r["grade"]:
                turns.append(("What grade is it?", f"Grade {r['grade']} ({GRADE_WORDS[r['grade']]})."))
            else:
                turns.append(("Which structure is shown?", f"The {r['anatomy']}."))
        out.append(_sample(r, "dlg", turns))
    return out


def knowledge_qa() -> list[tuple[str, str]]:
    """Fixed question/answer facts about the modalities, windows, attenuation and findings."""
    qa = [
        (
            f"What are the center and width of the CT {name} window?",
            f"The {name} window has a center of {c:g} HU and a width of {w:g} HU.",
        )
        for name, (c, w) in WINDOWS.items()
    ]
    qa += [
        (f"What is the typical CT attenuation of {t}?", f"{t[0].upper()}{t[1:]} measures about {v} HU.")
        for t, v in HU.items()
    ]
    qa += [(f"What does a {m} image look like?", MODALITY_LOOKS[m]) for m in GEN_MODALITIES]
    qa += [(f"What does {f} look like?", FINDING_LOOKS[f]) for f in FINDINGS if f != NO_FINDING]
    qa += [
        (f"Which department usually reads {m} images of the {r}?", f"{s.department}.")
        for m, regions in SPECS.items()
        for r, s in regions.items()
    ]
    qa += [
        (
            "What does the lesion grade mean here?",
            "Grade 1 is a small lesion, grade 2 a medium-sized lesion and grade 3 a large lesion.",
        ),
        (
            "How is a location in an image described?",
            "By the quadrant of the image: upper left, upper right, lower left or lower right.",
        ),
        ("Which imaging modalities are common in medicine?", ", ".join(MODALITIES) + "."),
        ("What is a Hounsfield unit?", "The CT attenuation scale: water is 0 HU and air is -1000 HU."),
    ]
    return qa


def text_only(rng: np.random.Generator, n: int) -> list[dict]:
    """``n`` text-only QA samples (no image key) drawn from :func:`knowledge_qa`."""
    qa = knowledge_qa()
    idx = np.concatenate([rng.permutation(len(qa)) for _ in range(n // len(qa) + 1)])[:n]
    return [
        {
            "id": f"text_{i:06d}",
            "conversations": [{"from": "human", "value": qa[j][0]}, {"from": "gpt", "value": qa[j][1]}],
        }
        for i, j in enumerate(idx)
    ]


def _described_mc(rec: dict, rng: np.random.Generator) -> list[tuple[str, str]]:
    """(prompt, answer) multiple-choice items answerable from the image's description alone. They
    teach a language model to pick an option's letter, as real pretrained LLMs already can."""
    context = f"The image shows: {caption_text(rec, rng)}"
    return [
        (f"{context}\n{build_prompt(question, opts)}", mc_answer(LETTERS[ans], opts[ans]))
        for _, question, opts, ans in mc_items(rec, rng)
    ]


def text_mc(records: list[dict], rng: np.random.Generator) -> list[dict]:
    """Text-only multiple-choice samples (one per record) whose answer is in the given description."""
    out = []
    for r in records:
        items = _described_mc(r, rng)
        prompt, answer = items[int(rng.integers(len(items)))]
        out.append(
            {
                "id": f"{r['id']}_textmc",
                "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}],
            }
        )
    return out


def lm_corpus(records: list[dict], rng: np.random.Generator) -> list[str]:
    """One-line texts for pretraining a tiny LM: captions, answers, questions, knowledge, and
    multiple-choice items answered from a description (so the LM learns to pick a letter)."""
    lines = [f"{q} {a}" for q, a in knowledge_qa()]
    lines += [q for qs in QUESTIONS.values() for q in qs] + list(CAPTION_PROMPTS)
    for r in records:
        lines.append(caption_text(r, rng))
        lines += [f"{p} {a}".replace("\n", " ") for p, a in _described_mc(r, rng)]
        if r["bbox"] is not None:
            lines.append(f"The region {box_text(r)} shows {finding_phrase(r)} in the {r['anatomy']}.")
    return lines


def _dump(obj, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def build_quickstart_data(
    out_dir: str | Path, n_train: int, n_bench: int, seed: int, size: int = 128
) -> dict:
    """Write the whole default data set (images, records, stage I-III json, LM corpus, benchmark TSV)."""
    out = Path(out_dir)
    rec_path = write_synthetic(
        out, n_train, seed, size, prefix="train", stream=0, records_name="records.jsonl"
    )
    bench_path = write_synthetic(
        out, n_bench, seed, size, prefix="bench", stream=1, records_name="bench_records.jsonl"
    )
    train, bench = read_rows(rec_path), read_rows(bench_path)
    rng = np.random.default_rng([seed, 2])
    caps, regs = captions(train, rng), region_captions(train, rng)
    instruct = (
        caps
        + regs
        + mc_questions(train, rng)
        + dialogues(train, rng)
        + text_only(rng, max(50, n_train // 10))
        + text_mc(train, rng)
    )
    instruct = [instruct[i] for i in rng.permutation(len(instruct))]
    corpus = out / "text" / "corpus.txt"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    corpus.write_text("\n".join(lm_corpus(train, rng)) + "\n", encoding="utf-8")
    return {
        "images": out / "images",
        "records": rec_path,
        "bench_records": bench_path,
        "captions": _dump(caps + regs, out / "train" / "captions.json"),
        "instruct": _dump(instruct, out / "train" / "instruct.json"),
        "corpus": corpus,
        "bench_tsv": write_vlmeval_tsv(mc_benchmark(bench, rng), out, out / "bench" / "synth_mc.tsv"),
    }
