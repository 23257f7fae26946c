"""Part of dimension 3 (image-text alignment): the blind-answerability test. A question that a
text-only model answers correctly does not need its image, and training on it teaches a model to
ignore images. Two text-only models:

- the question-only prior (always run): over the whole input, the answers each question (its text,
  options left out) was given; a sample's question is blind-answerable when, leaving the sample
  itself out, that question was seen at least `prior_min_support` times and the sample's answer has
  at least `prior_min_share` of them (among its offered options, for multiple choice). The prior is
  the majority-answer baseline of VQA: a single-modality source asking "which modality?" fails it.
- an LLM through medvl.llm (when a judge endpoint is configured): the question (with its options)
  without the image; a correct reply is blind-answerable.

Only the first question of a sample is tested, and only where its answer is short (multiple choice,
or at most `short_answer_words` words): a free-text caption cannot be reproduced by either model."""

from __future__ import annotations

import re
from collections import Counter, defaultdict

from medvl.prompts import IMAGE_TOKEN, MC_INSTRUCTION, OPTION_LETTERS, SHORT_INSTRUCTION

from .text import questions, replies

BLIND_PROMPT_VERSION = "quality-blind-v1"
BLIND_SYSTEM = (
    "You are answering a medical exam question but you cannot see the image it refers to. Answer from "
    "the text alone with your best guess: for multiple choice the option's letter only, otherwise a "
    "single word or phrase. Never refuse."
)


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def question_key(sample: dict) -> str | None:
    """The first question's text without the image token, option lines and instructions; None when the
    sample has no question to test (text-only format, no turns)."""
    qs = questions(sample)
    if not qs or sample.get("format") == "text":
        return None
    lines = [
        ln
        for ln in qs[0].replace(IMAGE_TOKEN, " ").splitlines()
        if ln.strip() not in (MC_INSTRUCTION, SHORT_INSTRUCTION) and not re.match(r"^\s*[A-I]\.\s", ln)
    ]
    return _norm(" ".join(lines)) or None


def gold_answer(sample: dict, short_words: int) -> str | None:
    """The normalized gold answer of the first question, or None when it is free text."""
    options, answer = sample.get("options"), sample.get("answer")
    if isinstance(options, list) and isinstance(answer, str) and answer in OPTION_LETTERS[: len(options)]:
        return _norm(str(options[OPTION_LETTERS.index(answer)]))
    rs = replies(sample)
    if not rs or len(rs[0].split()) > short_words or len(rs[0]) > 12 * short_words:
        return None
    return _norm(rs[0]) or None


class Prior:
    """The question-only prior over a whole input: answer counts per question key."""

    def __init__(self, samples: list[dict], short_words: int) -> None:
        self.short_words = short_words
        self.counts: dict[str, Counter] = defaultdict(Counter)
        for s in samples:
            key, gold = question_key(s), gold_answer(s, short_words)
            if key and gold:
                self.counts[key][gold] += 1

    def test(self, sample: dict) -> dict:
        """{"share": the gold answer's leave-one-out share, "support": answers seen, "testable": whether
        the question has a short answer a text-only model could give, "why": ...}."""
        if sample.get("format") == "text":
            return {
                "share": 0.0,
                "support": 0,
                "testable": False,
                "why": "text-only sample: no image to need",
            }
        key, gold = question_key(sample), gold_answer(sample, self.short_words)
        if key is None or gold is None:
            return {
                "share": 0.0,
                "support": 0,
                "testable": False,
                "why": "free-text answer: no text-only test",
            }
        c = Counter(self.counts[key])
        c[gold] -= 1  # leave the sample itself out
        options = sample.get("options")
        if isinstance(options, list) and options:
            c = Counter({k: v for k, v in c.items() if k in {_norm(str(o)) for o in options}})
        support = sum(c.values())
        share = c[gold] / support if support else 0.0
        why = f"{c[gold]} of {support} other answers to this question are this one"
        return {"share": share, "support": support, "testable": True, "why": why}


def blind_messages(sample: dict) -> list[dict] | None:
    """The text-only request for an LLM: the first question (options kept) without its image."""
    qs = questions(sample)
    if not qs:
        return None
    return [
        {"role": "system", "content": BLIND_SYSTEM},
        {"role": "user", "content": qs[0].replace(IMAGE_TOKEN, "").strip()},
    ]


def blind_correct(sample: dict, reply: str, short_words: int) -> bool:
    """Whether a text-only reply is the gold answer (the option's letter or text for multiple choice)."""
    gold = gold_answer(sample, short_words)
    said = _norm(reply)
    answer, options = sample.get("answer"), sample.get("options")
    if isinstance(options, list) and isinstance(answer, str):
        m = re.match(r"^\s*\(?([A-I])\b[.):]?", reply.strip())
        if m:
            return m.group(1) == answer
    return gold is not None and said == gold
