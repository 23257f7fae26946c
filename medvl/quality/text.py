"""Dimension 4 (language quality): repetition, language-ID confidence, translation consistency of a
Chinese sample with its English original, and MinHash signatures for near-duplicate text."""

from __future__ import annotations

import re
from collections import Counter
from functools import cache

from medvl.prompts import MC_INSTRUCTION

_WORD = re.compile(r"\w+", re.UNICODE)
_CJK = re.compile(r"[\u4e00-\u9fff]")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_BOX = re.compile(r"\[\s*-?\d+\s*,\s*-?\d+\s*,\s*-?\d+\s*,\s*-?\d+\s*\]")


def replies(sample: dict) -> list[str]:
    return [
        t.get("value", "")
        for t in sample.get("conversations") or []
        if isinstance(t, dict) and t.get("from") == "gpt"
    ]


def questions(sample: dict) -> list[str]:
    return [
        t.get("value", "")
        for t in sample.get("conversations") or []
        if isinstance(t, dict) and t.get("from") == "human"
    ]


def units(text: str) -> list[str]:
    """Words, with each Chinese character a unit of its own (Chinese has no spaces)."""
    out = []
    for w in _WORD.findall(text.lower()):
        out += list(w) if _CJK.search(w) else [w]
    return out


_SENTENCE_END = re.compile(r"(?<!\d)[.](?!\d)|[!?;\n。！？；]")


def repetition(text: str) -> float:
    """How much of a reply repeats itself: the larger of the share of its sentences that repeat an
    earlier one verbatim ("X. X. X." -> 0.67) and the share of its words (Chinese: characters) equal
    to the word before ("the the the" -> 0.67). Parallel sentences that differ in a word ("the liver
    lies left. The spleen lies left.") are not repetition: templates and careful writers use them."""
    sentences = [" ".join(units(x)) for x in _SENTENCE_END.split(text)]
    sentences = [x for x in sentences if x]
    dup_sentences = 1 - len(set(sentences)) / len(sentences) if sentences else 0.0
    u = units(text)
    stutter = sum(a == b for a, b in zip(u, u[1:])) / len(u) if len(u) > 1 else 0.0
    return max(dup_sentences, stutter)


def max_repetition(sample: dict) -> float:
    """The worst answer turn's repetition (a looping answer is bad however short the others)."""
    return max((repetition(r) for r in replies(sample)), default=0.0)


# Languages whose written form py3langid splits into several classes: Simplified Chinese text scores
# zh, wuu (Wu) and yue (Cantonese) at once (measured: 0.49 zh + 0.51 wuu on a template reply), so the
# confidence of a language is the mass of its whole family.
LANG_FAMILIES: dict[str, tuple[str, ...]] = {"zh": ("zh", "wuu", "yue")}
_OPTION_LINE = re.compile(r"^[A-Z]\. .*$", re.MULTILINE)
_NOT_LANGUAGE = re.compile(r"\[[^\]]*\]|<image>|[0-9]+(?:\.[0-9]+)?%?|[^\w\s]", re.UNICODE)


@cache
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def language_confidence(sample: dict) -> tuple[str, float]:
    """(py3langid's top language, probability of the sample's `lang` family) over the whole
    conversation, without box tokens, numbers, punctuation and the multiple-choice instruction. Of a
    multiple-choice sample only the question is read: its options, and the reply that repeats one, are
    label names whose medical Latin pulls py3langid away from English (measured on a synthetic item
    "What lies in the region ...? A. retina B. metastasis C. nevus D. cyst": p(en) = 0.59 with the
    options and reply, the question alone reads as English)."""
    turns = sample.get("conversations") or []
    if sample.get("options"):
        asked = [t for t in turns if t.get("from") == "human"]
        turns = [{"value": _OPTION_LINE.sub("", t.get("value", ""))} for t in asked]
    text = "\n".join(t.get("value", "") for t in turns)
    ranked = _identifier().rank(_NOT_LANGUAGE.sub(" ", text.replace(MC_INSTRUCTION, " ")))
    lang = str(sample.get("lang"))
    family = LANG_FAMILIES.get(lang, (lang,))
    return str(ranked[0][0]), float(sum(p for code, p in ranked if code in family))


def invariants(sample: dict) -> dict:
    """What a translation keeps: turns, numbers, box tokens, options' count, answer letter, box, image."""
    text = "\n".join(t.get("value", "") for t in sample.get("conversations") or [])
    return {
        "turns": len(sample.get("conversations") or []),
        "boxes": sorted(b.replace(" ", "") for b in _BOX.findall(text)),
        "numbers": sorted(_NUMBER.findall(_BOX.sub(" ", text))),
        "options": len(sample.get("options") or []),
        "answer": sample.get("answer"),
        "box": sample.get("box"),
        "image": sample.get("image"),
        "format": sample.get("format"),
    }


def translation_consistency(sample: dict, original: dict) -> tuple[float, list[str]]:
    """Share of `invariants` a Chinese sample keeps from its English original, and those it breaks."""
    a, b = invariants(sample), invariants(original)
    broken = [k for k in a if a[k] != b[k]]
    return 1 - len(broken) / len(a), broken


def shingles(sample: dict) -> set[str]:
    """Word 3-grams (characters for Chinese) of the whole conversation, the image token left out."""
    text = " ".join(t.get("value", "") for t in sample.get("conversations") or []).replace("<image>", " ")
    u = units(text)
    return {" ".join(u[i : i + 3]) for i in range(max(1, len(u) - 2))} if u else {""}


@cache
def _permutations(num_perm: int):
    """datasketch's hash permutations for seed 1, drawn once: a MinHash draws them anew otherwise
    (1.8 ms each, 58 s over the quickstart's 32k samples)."""
    from datasketch import MinHash

    m = MinHash(num_perm=num_perm, seed=1)
    return m.permutations, m.scheme


def minhash(sample: dict, num_perm: int):
    from datasketch import MinHash

    permutations, scheme = _permutations(num_perm)
    m = MinHash(num_perm=num_perm, seed=1, permutations=permutations, scheme=scheme)
    m.update_batch([s.encode() for s in sorted(shingles(sample))])
    return m


def most_common_share(counts: Counter, exclude: str | None) -> tuple[str | None, float, int]:
    """(top answer, its share, support) of `counts` with one occurrence of `exclude` taken out (the
    sample's own answer: leave-one-out)."""
    c = Counter(counts)
    if exclude is not None and c.get(exclude):
        c[exclude] -= 1
    total = sum(c.values())
    if not total:
        return None, 0.0, 0
    top, n = max(sorted(c.items()), key=lambda kv: kv[1])
    return top, n / total, total
