"""Baselines scored beside every VQA run, so a number can be read against what needs no image:

- **random guess** (multiple choice): 1 / number of options, averaged (in :func:`scoring.summarize`);
- **majority**: the most frequent answer of the question's answer type (closed/open, or the
  benchmark's category when it has no answer type; for multiple choice, the most frequent letter),
  given to every question of that type. Taken from the training split when one is given; otherwise
  from the evaluated questions' own gold answers, which makes it the best constant answer in
  hindsight (an optimistic baseline, and the report says so);
- **question prior** (only with a training split): the most frequent training answer to the same
  question text (normalised as answers are), else the majority answer of its type. For multiple
  choice the answer is matched by option text and given as that option's letter. A model that does
  not beat this prior answers from the wording, not the image.

Priors are built from the training split only (:func:`build_prior`), never from the questions being
scored; the prior is saved as `prior.json` beside the predictions so re-scoring uses the same one.
"""

from __future__ import annotations

from collections import Counter

from medvl.eval.benchmarks import Item
from medvl.eval.scoring import normalize_answer

BASELINES = ("majority", "question_prior")
ANSWER_TYPE = "answer type"


def type_key(kind: str, groups: dict[str, str], category: str | None) -> str:
    """The answer type a majority answer is taken per: the `answer type` group (closed/open), else
    the benchmark's category group, else the question kind."""
    if ANSWER_TYPE in groups:
        return groups[ANSWER_TYPE]
    if category and category in groups:
        return groups[category]
    return kind


def _answer_text(kind: str, answer: str, options: dict[str, str]) -> str:
    """What a question-only prior counts: the option text for multiple choice, else the answer."""
    return str(options.get(answer, "")) if kind == "mc" else answer


def _most_frequent(answers: list[str]) -> str:
    """The most frequent answer by its normalised form (ties: the first seen), as first written."""
    counts = Counter(normalize_answer(a) for a in answers)
    best = counts.most_common(1)[0][0]  # most_common keeps first-seen order among equal counts
    return next(a for a in answers if normalize_answer(a) == best)


def majority_answers(rows: list[tuple[str, dict[str, str], str]], category: str | None) -> dict[str, str]:
    """{answer type: most frequent answer} from (kind, groups, gold answer) triples; also one entry
    per kind ("kind:closed") used for a type the source never saw."""
    by_type: dict[str, list[str]] = {}
    for kind, groups, answer in rows:
        if str(answer).strip():
            by_type.setdefault(type_key(kind, groups, category), []).append(answer)
            by_type.setdefault(f"kind:{kind}", []).append(answer)
    return {t: _most_frequent(a) for t, a in by_type.items()}


def build_prior(train: list[Item], category: str | None, source: str) -> dict:
    """The majority answers and the question-only prior from training questions."""
    if not train:
        raise ValueError(f"{source}: the training split has no questions")
    by_question: dict[str, list[str]] = {}
    for it in train:
        text = _answer_text(it.kind, it.answer, it.options)
        if text.strip():
            by_question.setdefault(normalize_answer(it.question), []).append(text)
    return {
        "source": source,
        "train_questions": len(train),
        "majority": majority_answers([(it.kind, it.groups, it.answer) for it in train], category),
        "by_question": {q: _most_frequent(a) for q, a in by_question.items()},
    }


def _majority(row: dict, majority: dict[str, str], category: str | None) -> str:
    key = type_key(row["kind"], row.get("groups", {}), category)
    return majority.get(key, majority.get(f"kind:{row['kind']}", ""))


def _prior(row: dict, prior: dict, category: str | None) -> tuple[str, bool]:
    """The question prior's answer, and whether it came from the same question text."""
    text = prior["by_question"].get(normalize_answer(row.get("question", "")))
    if text is not None:
        if row["kind"] != "mc":
            return text, True
        wanted = normalize_answer(text)
        letter = next((k for k, v in row["options"].items() if normalize_answer(v) == wanted), None)
        if letter is not None:
            return letter, True
    return _majority(row, prior["majority"], category), False


def baseline_predictions(rows: list[dict], prior: dict | None, category: str | None) -> dict:
    """{name: {"predictions": [one per row], "info": {...}}} for the majority baseline and, with a
    prior, the question-only prior."""
    if prior is None:
        majority = majority_answers([(r["kind"], r.get("groups", {}), r["answer"]) for r in rows], category)
        info = {
            "source": "the evaluated questions' own gold answers (no training split given): the best "
            "constant answer per type in hindsight, an optimistic baseline"
        }
    else:
        majority = prior["majority"]
        info = {"source": f"training split {prior['source']} ({prior['train_questions']} questions)"}
    types = {k: v for k, v in majority.items() if not k.startswith("kind:")}
    out = {
        "majority": {
            "predictions": [_majority(r, majority, category) for r in rows],
            "info": info | {"answers": types},
        }
    }
    if prior is not None:
        answers = [_prior(r, prior, category) for r in rows]
        out["question_prior"] = {
            "predictions": [a for a, _ in answers],
            "info": {
                "source": info["source"],
                "seen_questions": sum(seen for _, seen in answers),
                "questions": len(rows),
            },
        }
    return out
