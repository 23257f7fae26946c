"""Scoring, with no model in the loop: a prediction file can be scored again at any time.

A prediction row (one JSON object per line) has `id`, `kind` ("mc", "closed" or "open"), `answer`
(the gold letter for "mc", else the gold text; empty when the split has no answers), `prediction`
(the model's raw text), and optionally `options` ({"A": text, ...}, needed for "mc"), `groups`
({breakdown: value}) and `judge` (a letter an LLM judge chose for an answer exact matching left
unresolved). medvl writes exactly this; another tool's output converts to it line by line.

- Multiple choice: :func:`medvl.eval.matching.extract_choice`, VLMEvalKit's exact-matching chain
  (the commit it follows is in :mod:`medvl.eval.matching`). A refusal or an unresolved answer is
  wrong, and both are counted.
- Closed questions: exact match after :func:`normalize_answer`.
- Open questions: recall of the gold answer's tokens (LLaVA-Med's metric) and exact match.
"""

from __future__ import annotations

import json
import random
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from medvl.eval.matching import API_FAILURE, REFUSED, extract_choice
from medvl.eval.stats import mean_interval

if TYPE_CHECKING:
    from medvl.llm import LLMClient

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_CJK = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"
_TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")


def normalize_answer(text: str) -> str:
    """Unicode-normalised (NFKC), lower case, punctuation and English articles removed, whitespace
    collapsed: "Yes." == "yes", "The Liver" == "liver", full-width "ＣＴ" == "ct"."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_tokens(text: str) -> list[str]:
    """Words of the normalised text; Chinese/Japanese/Korean characters count one token each, as
    those scripts do not separate words with spaces."""
    return _TOKEN.findall(normalize_answer(text))


def token_recall(prediction: str, gold: str) -> float:
    """Share of the gold answer's tokens (with multiplicity) that the prediction contains."""
    gold_tokens = Counter(answer_tokens(gold))
    if not gold_tokens:
        return 0.0
    common = gold_tokens & Counter(answer_tokens(prediction))
    return sum(common.values()) / sum(gold_tokens.values())


def score_row(row: dict) -> dict:
    """The row with its verdict added: `correct` (bool), and `choice` for multiple choice or
    `recall` for open questions."""
    kind, gold, pred = row["kind"], str(row["answer"]), str(row.get("prediction", ""))
    out = dict(row)
    if kind == "mc":
        choice = extract_choice(pred, row["options"])
        out["choice"] = choice if choice is not None else row.get("judge")
        out["correct"] = out["choice"] == gold
    elif kind == "closed":
        out["correct"] = normalize_answer(pred) == normalize_answer(gold)
    elif kind == "open":
        out["correct"] = normalize_answer(pred) == normalize_answer(gold)
        out["recall"] = token_recall(pred, gold)
    else:
        raise ValueError(f"row {row.get('id')!r}: unknown kind {kind!r} (mc, closed or open)")
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(scored: list[dict]) -> dict:
    """Metrics of a set of scored rows. `accuracy` is the share answered correctly (option letter,
    or normalised exact answer); the per-kind fields say which measure each part is. `ci95` holds
    each mean metric's 95% bootstrap interval over these questions (:mod:`medvl.eval.stats`)."""
    mc = [r for r in scored if r["kind"] == "mc"]
    closed = [r for r in scored if r["kind"] == "closed"]
    open_ = [r for r in scored if r["kind"] == "open"]
    per_question: dict[str, list[float]] = {"accuracy": [float(r["correct"]) for r in scored]}
    out: dict = {"n": len(scored)}
    if mc:
        per_question["random_guess"] = [1 / len(r["options"]) for r in mc]
        out |= {
            "unresolved": sum(r["choice"] is None for r in mc),
            "refused": sum(r["choice"] == REFUSED for r in mc),
        }
    if closed:
        out["closed_n"] = len(closed)
        per_question["closed_accuracy"] = [float(r["correct"]) for r in closed]
    if open_:
        out["open_n"] = len(open_)
        per_question["open_recall"] = [r["recall"] for r in open_]
        per_question["open_exact_match"] = [float(r["correct"]) for r in open_]
    out |= {name: _mean(values) for name, values in per_question.items()}
    out["ci95"] = {name: mean_interval(values) for name, values in per_question.items()}
    return out


def score(rows: list[dict]) -> tuple[dict, list[dict]]:
    """Overall metrics and one breakdown per group name; rows without a gold answer (a test split
    with hidden answers) are counted as `unscored`. Returns (metrics, scored rows)."""
    scored = [score_row(r) for r in rows if str(r.get("answer", "")).strip()]
    breakdowns: dict[str, dict[str, dict]] = {}
    for name in sorted({g for r in scored for g in r.get("groups", {})}):
        values = sorted({r["groups"][name] for r in scored if name in r.get("groups", {})})
        breakdowns[name] = {
            v: summarize([r for r in scored if r.get("groups", {}).get(name) == v]) for v in values
        }
    metrics = {"overall": summarize(scored), "breakdowns": breakdowns, "unscored": len(rows) - len(scored)}
    return metrics, scored


def read_predictions(path: Path) -> list[dict]:
    """Rows of a prediction file. A last line cut off by a killed run is ignored; any other bad line
    raises ValueError naming the file, line and field."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    rows = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):
                break
            raise ValueError(f"{path} line {n}: not JSON ({e})") from e
        for key in ("id", "kind", "answer", "prediction"):
            if key not in row:
                raise ValueError(f"{path} line {n}: missing field {key!r}")
        if row["kind"] == "mc" and not isinstance(row.get("options"), dict):
            raise ValueError(f"{path} line {n}: multiple-choice row needs 'options' as {{letter: text}}")
        rows.append(row)
    return rows


# The judge fallback follows VLMEvalKit's `extract_answer_from_item` in
# `vlmeval/dataset/utils/multiple_choice.py` at the commit :mod:`medvl.eval.matching` names: its two
# prompts (`build_prompt`, and `build_prompt_cn` for a question containing a CJK ideograph), the options
# as `build_option_str` writes them, three tries, replies holding "Failed to obtain answer via API"
# ignored, and a random option (or Z) once all three fail.
JUDGE_PROMPT = (
    "You are an AI assistant who will help me to match an answer with several options of a single-choice "
    "question. You are provided with a question, several options, and an answer, and you need to find "
    "which option is most similar to the answer. If the meaning of all options are significantly different "
    "from the answer, output Z. Your should output a single uppercase character in A, B, C, D (if they are "
    "valid options), and Z. \n"
    "Example 1: \nQuestion: What is the main object in image?\n"
    "Options: A. teddy bear B. rabbit C. cat D. dog\n"
    "Answer: a cute teddy bear\nYour output: A\n"
    "Example 2: \nQuestion: What is the main object in image?\n"
    "Options: A. teddy bear B. rabbit C. cat D. dog\n"
    "Answer: Spider\nYour output: Z\n"
    "Example 3: \nQuestion: {question}?\nOptions: {options}\nAnswer: {prediction}\nYour output: "
)
JUDGE_PROMPT_ZH = (
    "你是一个帮助我匹配答案与单选题中多个选项的 AI 助手。"
    "你会被提供：一个问题，多个选项，一个答案。你的任务是找到与答案意义最相近的选项。"
    "如果所有选项的意义都与答案显著不同，则输出 Z。"
    "你应该输出一个单个的大写字母，例如 A, B, C, D（如果它们是有效选项），或 Z。"
    "例 1:"
    "问题: 图中最主要的物体是什么?\n选项: A. 泰迪熊 B. 兔子 C. 猫 D. 狗\n答案: 一只可爱的泰迪熊\n输出: A\n"
    "例 2: \n"
    "问题: 图中最主要的物体是什么?\n选项: A. 泰迪熊 B. 兔子 C. 猫 D. 狗\n答案: 蜘蛛\n输出: Z\n"
    "例 3: \n"
    "问题: {question}?\n选项: {options}\n答案: {prediction}\n输出: "
)
_CJK_IDEOGRAPH = re.compile("[\u4e00-\u9fff]")  # VLMEvalKit's cn_string
JUDGE_TRIES = 3
# The judge is asked for one letter. VLMEvalKit leaves its OpenAI wrapper's 2048-token default; medvl
# caps the reply (a letter, or "The answer is X." at most) so that a rambling judge costs little.
JUDGE_MAX_TOKENS = 32
JUDGE_RANDOM_LOG = "Failed to predict, thus randomly generate one."


def judge_options(options: dict[str, str]) -> str:
    """The options as VLMEvalKit's `build_option_str` writes them into the judge prompt."""
    return "There are several options: \n" + "".join(f"{k}. {v}\n" for k, v in options.items())


def judge_prompt(question: str, options: dict[str, str], prediction: str) -> str:
    """VLMEvalKit's judge prompt for one answer: the Chinese one when the question contains Chinese."""
    template = JUDGE_PROMPT_ZH if _CJK_IDEOGRAPH.search(question) else JUDGE_PROMPT
    return template.format(question=question, options=judge_options(options), prediction=prediction)


def judge_unresolved(rows: list[dict], client: LLMClient, model: str, tries: int = JUDGE_TRIES) -> int:
    """Ask an LLM (any OpenAI-compatible endpoint, through `client`) to map each unresolved
    multiple-choice answer onto an option, as VLMEvalKit does: up to `tries` replies per answer (past
    the cache, which would repeat the reply), each read with :func:`extract_choice`; a reply holding
    "Failed to obtain answer via API", or a request that failed for good, counts as a failed try. The
    verdict goes to the row's `judge` field; after `tries` failures it is a random option or Z
    (VLMEvalKit's `rd.choice`, here seeded with the question id so that re-scoring reproduces it) and
    `judge_log` says so. Returns how many rows were asked."""
    from concurrent.futures import ThreadPoolExecutor

    from medvl.llm import LLMError

    todo = [
        row
        for row in rows
        if row["kind"] == "mc"
        and "judge" not in row
        and not extract_choice(row["prediction"], row["options"])
    ]

    def ask(row: dict, attempt: int) -> str:
        messages = [
            {
                "role": "user",
                "content": judge_prompt(row.get("question", ""), row["options"], row["prediction"]),
            }
        ]
        try:
            reply = client.complete(
                model, messages, cache=attempt == 0, temperature=0, max_tokens=JUDGE_MAX_TOKENS
            )
        except LLMError:
            return API_FAILURE  # what VLMEvalKit's wrappers answer once their own retries are spent
        return reply.text or API_FAILURE  # as VLMEvalKit's wrappers turn an empty answer

    pending = todo
    with ThreadPoolExecutor(max(1, client.max_concurrency)) as pool:
        for attempt in range(tries):
            replies = list(pool.map(ask, pending, [attempt] * len(pending)))
            for row, text in zip(pending, replies, strict=True):
                verdict = None if API_FAILURE in text else extract_choice(text, row["options"])
                if verdict:
                    row["judge"] = verdict
            pending = [row for row in pending if "judge" not in row]
    for row in pending:
        choices = [*row["options"], REFUSED] if REFUSED not in row["options"] else []
        row["judge"] = random.Random(str(row["id"])).choice(choices)
        row["judge_log"] = JUDGE_RANDOM_LOG
    return len(todo)
