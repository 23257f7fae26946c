"""medvl's multiple-choice answer matching against VLMEvalKit's own functions, side by side.

The reference is VLMEvalKit's `matching_util.py`, vendored verbatim in
tests/data/vlmevalkit_matching_reference.py at the commit medvl.eval.matching names. Every case is
run through both; they must agree on every one.

On this case set (6445 cases) the matcher medvl used before, a port of an older VLMEvalKit without
the "answer is X" rule, the length guard and the API-failure rule, agreed on 5376 (83.4%); it also
raised on numbers as option texts (269 cases), and agreed on 87.1% of the rest.
"""

from __future__ import annotations

import importlib.util
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from conftest import ChatFixtureServer, chat_completion, chat_error, serve_in_thread

from medvl.eval import matching
from medvl.eval.matching import choice_by_letter, choice_by_text, extract_choice

REFERENCE_FILE = Path(__file__).parent / "data" / "vlmevalkit_matching_reference.py"


def load_reference():
    spec = importlib.util.spec_from_file_location("vlmevalkit_matching_reference", REFERENCE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def reference(monkeypatch):
    # VLMEvalKit reads VERBOSE at call time; medvl matches its default, unset.
    monkeypatch.delenv("VERBOSE", raising=False)
    return load_reference()


# ------------------------------------------------------------------------------------ the cases

OPTION_SETS: list[dict[str, object]] = [
    {"A": "CT", "B": "MR", "C": "X-ray", "D": "PET"},
    {"A": "CT", "B": "CT with contrast", "C": "MRI", "D": "Ultrasound"},  # an option inside another
    {"A": "lung", "B": "lung cancer", "C": "pneumonia"},
    {"A": "Yes", "B": "No"},
    {"A": "1", "B": "2", "C": "3", "D": "4"},
    {"A": 5, "B": 10, "C": 15, "D": 20},  # numbers as options, not strings
    {"A": "肝脏", "B": "肺", "C": "肾脏", "D": "心脏"},
    {
        "A": "Adenocarcinoma of the lung with pleural invasion",
        "B": "Squamous cell carcinoma of the left main bronchus",
        "C": "Small cell lung cancer with mediastinal lymph nodes",
        "D": "Benign hamartoma",
    },
    {"A": "Left", "B": "Right", "C": "Both", "D": "Neither", "E": "Cannot be determined"},
    {"A": "T1", "B": "T2", "C": "FLAIR", "D": "DWI", "E": "ADC", "F": "SWI"},
    {"A": "Type A dissection", "B": "Type B dissection", "C": "Aneurysm"},  # letters inside texts
    {"A": "a", "B": "b", "C": "c", "D": "d"},  # option texts that are letters
    {"A": "Zone Z", "B": "Zone Y"},
    {"A": "Liver", "B": "liver and spleen", "C": "Spleen", "D": "None of the above"},
    {"A": "", "B": "MR", "C": "CT"},  # an empty option text occurs in every answer
]

EXPLANATIONS = [
    "The image shows a hyperdense lesion in the right hemisphere with surrounding oedema.",
    "Based on the windowing and the appearance of bone, this is most consistent with the finding.",
    "A 45-year-old man presents with chest pain; the scan shows no acute abnormality.",
    "Here's why: the signal characteristics, the anatomy and the clinical history all point one way.",
    "图像显示右肺上叶有一个结节，边缘不规则。",
]

# {L}: the letter, {l}: it lower-cased, {T}: its option text, {M}/{U}: another option's letter/text,
# {E}: an explanation, {N}: a letter that is not an option.
TEMPLATES = [
    "{L}",
    "{l}",
    "({L})",
    "({l})",
    "{L}.",
    "{L})",
    "[{L}]",
    "**{L}**",
    "  {L}  ",
    "\n{L}\n",
    "{L}. {T}",
    "{L}: {T}",
    "({L}) {T}",
    "{l}. {T}",
    "{T}",
    "{T}.",
    "It is {T}.",
    "The answer is {L}",
    "The answer is {L}.",
    "the answer is {l}",
    "The answer is: {L}",
    "The answer is ({L})",
    "The correct answer is **{L}**. Here's why: {E}",
    "The correct answer is **{L}**: {T}. {E}",
    "Correct answer is {L}",
    "My answer is {N}",
    "The answer is definitely not {M}",
    "The answer is {L}, not {M}.",
    "Answer: {L}",
    "Answer: **{L}**",
    "Answer: {l}",
    "Answer: {T}",
    "Final answer: {L}. {T}",
    "Option {L} - {T}, because {E}",
    "Option {L}",
    "option {l}",
    "{L} - right, because it matches.",
    "{L} and {M}",
    "{L} or {M}",
    "Either {L} or {M}.",
    "I think it's {L} or {M}",
    "Not {M}, the answer is {L}",
    "{M} is wrong; {L} is right.",
    "{L}{M}",
    "{E} So the answer is {L}.",
    "{E} Therefore {T}.",
    "{E} The finding is {T}. {E}",
    "{T} {E}",
    "{L}. {E}",
    "{L} {E} {E}",
    "{E}",
    "{T} or {U}",
    "Not {U} but {T}",
    "{U}? No, {T}.",
    "答案是{L}",
    "答案：{L}",
    "答案是 {L}",
    "选项{L}",
    "选项 {L}",
    "{L}。",
    "最终答案：{L}。{T}",
    "答案是{T}",
    "{T}。{E}",
    "I cannot determine the answer from the image.",
    "Cannot determine the answer",
    "Cannot determine the answer. {L}",
    "Sorry, I can't help with images of people yet.",
    "I'm sorry, but without the image provided I cannot answer. {L}",
    "I can't process this file.",
    "Z",
    "None of the above: Z",
    "Z. None of the options",
    "{L} or Z",
    "Failed to obtain answer via API",
    "Failed to obtain answer via API. {L}",
    "Failed to obtain answer via API. {T}",
    "",
    " ",
    "I don't know",
    "None",
    "A",
    "a",
    "A {T}",
    "There is a {T} visible here",
    "An {T}",
    "{L}, {L}, {L}",
    "{L} {L}",
]

PREFIXES = ["", "Sure! ", "Looking at the image, ", "**", "答：", "Answer - ", "\t", "I'd say "]
SUFFIXES = ["", ".", "!", " ", "**", "\n\n", " (final)", " I hope this helps.", f" {EXPLANATIONS[1]}"]


def fill(template: str, options: dict[str, object], letter: str, other: str, rng: random.Random) -> str:
    absent = next(c for c in "EFGHZ" if c not in options)
    return template.format(
        L=letter,
        l=letter.lower(),
        T=options[letter],
        M=other,
        U=options[other],
        E=rng.choice(EXPLANATIONS),
        N=absent,
    )


_NESTED = {"A": "CT", "B": "CT with contrast", "C": "MRI", "D": "Ultrasound"}
# (answer, options, what the chain gives), the reason in the comment.
EXAMPLES: list[tuple[str, dict[str, object], str | None]] = [
    ("The correct answer is **C**. Here's why: the signal pattern ...", _NESTED, "C"),  # answer is X
    ("Option B - right.", _NESTED, "B"),  # a lone letter among the last four tokens
    ("Option B - right, because the vessels are bright.", _NESTED, None),  # B too early; no text
    ("Option B - right, the answer is B.", _NESTED, "B"),  # B twice, too early; then "answer is B"
    ("MRI", _NESTED, "C"),  # option text
    ("CT with contrast", _NESTED, None),  # "CT" occurs in it too
    # Far longer than the options together: an option text found in passing does not count.
    ("The image shows an abdomen; an MRI would show the lesion better than this study.", _NESTED, None),
    ("答案是B", _NESTED, None),  # one token, and no option text in it
    ("Cannot determine the answer", _NESTED, "Z"),  # refusal phrase
    ("Z", _NESTED, "Z"),  # a lone Z and no option letter
    ("Failed to obtain answer via API", _NESTED, None),
    ("b", _NESTED, None),  # letters are case-sensitive
    ("the answer is b", _NESTED, "B"),  # ... except in "answer is X"
]


def hand_written() -> list[tuple[str, dict[str, object]]]:
    """Cases picked to sit on each rule's edge."""
    modality = OPTION_SETS[0]
    nested = OPTION_SETS[1]
    return [
        ("The correct answer is **C**. Here's why: the bone is bright.", modality),
        ("The answer is about the left lung", modality),  # "is a..." reads as A
        ("The answer is correct answer is B", modality),  # the first "answer is" wins: c -> C
        ("answer   is\n**b**", modality),
        ("The answer is E", OPTION_SETS[8]),  # only A-D are read by the "answer is" rule
        ("The answer is D", {"A": "x", "B": "y", "C": "z"}),  # D is no option
        ("CT with contrast", nested),  # both A and B occur
        ("ct with contrast", nested),
        ("CT", nested),
        ("MRI", nested),
        ("mri", nested),
        ("It is an MRI of the brain with contrast", nested),
        ("x" * 15, {"A": "x", "B": "yy"}),
        ("x" * 7, {"A": "xxx", "B": "y"}),  # exactly the length limit
        ("x" * 8 + "xxx", {"A": "xxx", "B": "y"}),  # one past it
        ("İstanbul", {"A": "istanbul", "B": "ankara"}),  # lower() lengthens İ
        ("A B C D", modality),
        ("A. CT B. MR C. X-ray D. PET", modality),
        ("one two three four B", modality),
        ("one two three four five B", modality),
        ("B one two three four", modality),
        ("B one two three", modality),
        ("B one two three four five six", modality),
        ("The answer is B one two three four five six", modality),
        ("Z Z", modality),
        ("Z and B", modality),
        ("z", modality),
        ("5", OPTION_SETS[5]),
        ("10 mg", OPTION_SETS[5]),
        ("15", OPTION_SETS[5]),
        ("the answer is 10", OPTION_SETS[5]),
        ("2", OPTION_SETS[4]),
        ("12", OPTION_SETS[4]),
        ("Option 3", OPTION_SETS[4]),
        ("ＢＭ", modality),  # full-width letters are other characters
        ("Ｂ", modality),
        ("{B}", modality),
        ("#B#", modality),
        ("B;", modality),
        ("B-", modality),
        ("B's", modality),
        ("\u00a0B\u00a0", modality),  # non-breaking spaces split too
        ("B\u3000", modality),
        ("答案是B", OPTION_SETS[6]),
        ("选项C", OPTION_SETS[6]),
        ("肺", OPTION_SETS[6]),
        ("我认为是肺部病变", OPTION_SETS[6]),
        ("The answer is B" * 3, modality),
        ("Failed to obtain answer via API Z", modality),
        ("Sorry, I can't help with images of people yet. The answer is B.", modality),
        ("cannot determine the answer", modality),  # refusal phrases are case-sensitive
        ("Type A", OPTION_SETS[10]),
        ("type b dissection", OPTION_SETS[10]),
        ("A", OPTION_SETS[11]),
        ("a", OPTION_SETS[11]),
        ("bad", OPTION_SETS[11]),
        ("Zone Z", OPTION_SETS[12]),
        ("zone y", OPTION_SETS[12]),
        ("None of the above", OPTION_SETS[13]),
        ("liver", OPTION_SETS[13]),
        ("Spleen", OPTION_SETS[13]),
        ("MR", OPTION_SETS[14]),
        ("", OPTION_SETS[14]),
        ("", {"A": "", "B": ""}),
        ("anything", {"A": "", "B": ""}),
        (None, OPTION_SETS[0]),
        (12, OPTION_SETS[4]),
        ("C", {"A": "x"}),
        ("A", {"A": "x"}),
        ("x", {"A": "x"}),
        ("ct", {"a": "CT", "b": "MR"}),  # keys must be capital letters: both raise
        ("B", {"1": "x", "B": "y"}),  # ... but only once the text stage is reached
        ("x" * 30, {"a": "x"}),
    ]


def generated(seed: int = 0) -> Iterator[tuple[str, dict[str, object]]]:
    rng = random.Random(seed)
    # Every template with every option set and every letter.
    for options in OPTION_SETS:
        letters = list(options)
        for template in TEMPLATES:
            for letter in letters:
                other = rng.choice([c for c in letters if c != letter])
                yield fill(template, options, letter, other, rng), options
    # Then random wrappings of random templates.
    for _ in range(1500):
        options = rng.choice(OPTION_SETS)
        letters = list(options)
        letter = rng.choice(letters)
        other = rng.choice([c for c in letters if c != letter])
        core = fill(rng.choice(TEMPLATES), options, letter, other, rng)
        yield rng.choice(PREFIXES) + core + rng.choice(SUFFIXES), options


def all_cases() -> list[tuple[object, dict[str, object]]]:
    return [(a, o) for a, o, _ in EXAMPLES] + hand_written() + list(generated())


def outcome(function, answer, options) -> str | None:
    """The verdict, with VLMEvalKit's False as None; an invalid options dict is an outcome too."""
    try:
        return function(answer, dict(options)) or None  # a copy: VLMEvalKit lower-cases it in place
    except (AssertionError, ValueError):
        return "error"


# ------------------------------------------------------------------------------------ the tests


def test_agrees_with_vlmevalkit_on_every_case(reference) -> None:
    cases = all_cases()
    assert len(cases) > 5000
    disagreements = []
    for answer, options in cases:
        expected = outcome(reference.can_infer, answer, options)
        got = outcome(extract_choice, answer, options)
        if got != expected:
            disagreements.append(f"{answer!r} {options}: VLMEvalKit {expected!r}, medvl {got!r}")
    print("\n".join(disagreements))
    assert not disagreements, f"{len(disagreements)} of {len(cases)} cases disagree"


def test_each_stage_agrees_with_vlmevalkit(reference) -> None:
    """The two stages separately, so that a difference in one cannot hide behind the other."""
    for answer, options in all_cases():
        answer = str(answer)
        assert outcome(choice_by_letter, answer, options) == outcome(
            reference.can_infer_option, answer, options
        ), (answer, options)
        assert outcome(choice_by_text, answer, options) == outcome(
            reference.can_infer_text, answer, options
        ), (answer, options)


def test_cases_exercise_every_rule() -> None:
    """The case set reaches every rule often, so the agreement above means something."""
    rules: Counter[str] = Counter()
    for answer, options in all_cases():
        if not all(k.isupper() for k in options):
            continue  # the cases with invalid keys
        answer = str(answer)
        letter = choice_by_letter(answer, options)
        if matching.API_FAILURE in answer:
            rules["api failure"] += 1
        if any(r in answer for r in matching.REFUSALS):
            rules["refusal phrase"] += 1
        if letter and letter != "Z" and letter in matching._tokens(answer):
            rules["lone letter"] += 1
        elif letter and letter != "Z":
            rules["answer is X"] += 1
        if letter is None:
            found = [k for k, v in options.items() if str(v).lower() in answer.lower()]
            text = choice_by_text(answer, options)
            if text:
                rules["option text"] += 1
            elif len(found) == 1:
                rules["length guard"] += 1
            elif len(found) > 1:
                rules["several option texts"] += 1
            else:
                rules["unresolved"] += 1
    for rule in [
        "api failure",
        "refusal phrase",
        "lone letter",
        "answer is X",
        "option text",
        "length guard",
        "several option texts",
        "unresolved",
    ]:
        assert rules[rule] >= 30, (rule, rules)


def test_verbose_chat_answers() -> None:
    """Readable examples of what the current chain does with a chat model's answers (each also
    checked against VLMEvalKit in the parity test)."""
    for answer, options, expected in EXAMPLES:
        assert extract_choice(answer, options) == expected, answer


def test_bad_option_keys() -> None:
    with pytest.raises(ValueError, match="capital letter"):
        extract_choice("ct", {"a": "CT", "b": "MR"})


def test_reference_is_the_named_commit() -> None:
    """The vendored file and the module name the same VLMEvalKit commit."""
    header = REFERENCE_FILE.read_text(encoding="utf-8")[:1000]
    assert matching.VLMEVALKIT_COMMIT in header
    assert matching.VLMEVALKIT_COMMIT[:12] in matching.MATCHING_VERSION


def test_reports_name_the_matching(tmp_path: Path) -> None:
    from medvl.eval.report import build_report, to_markdown

    options = {"A": "x", "B": "y"}
    rows = [{"id": "1", "kind": "mc", "answer": "B", "prediction": "The answer is B.", "options": options}]
    report = build_report(rows, {"bench": "custom", "model": "m"})
    assert report["overall"]["accuracy"] == 1.0
    assert matching.VLMEVALKIT_COMMIT[:12] in report["multiple_choice_matching"]
    assert report["multiple_choice_matching"] in to_markdown(report)


# ------------------------------------------------------------------ the LLM judge fallback

JUDGE_REFERENCE_FILE = Path(__file__).parent / "data" / "vlmevalkit_judge_reference.py"
API_FAILED = "Failed to obtain answer via API."  # what VLMEvalKit's wrappers answer after failing
HTTP_400 = object()  # a scripted reply: the fixture endpoint refuses the request


class ScriptedJudge(ChatFixtureServer):
    """TEST FIXTURE: a loopback OpenAI-style endpoint whose reply to a prompt is the next of the
    replies scripted for that prompt (HTTP_400: a 400 error instead). It records every prompt."""

    def __init__(self, script: dict[str, list]) -> None:
        super().__init__()
        self.script = {k: list(v) for k, v in script.items()}
        self.prompts: list[str] = []

    def reply(self, body: dict, headers) -> tuple[int, dict, dict]:
        prompt = body["messages"][-1]["content"]
        with self.lock:
            self.prompts.append(prompt)
            reply = self.script[prompt].pop(0)
        if reply is HTTP_400:
            return 400, chat_error("scripted refusal", "invalid_request_error"), {}
        return 200, chat_completion(body["model"], reply), {}


class _ScriptedModel:
    """VLMEvalKit's side of the same script: `generate(prompt)` as its API wrappers behave."""

    def __init__(self, script: dict[str, list]) -> None:
        self.script = {k: list(v) for k, v in script.items()}
        self.prompts: list[str] = []

    def generate(self, prompt: str) -> str:
        self.prompts.append(prompt)
        reply = self.script[prompt].pop(0)
        return API_FAILED if reply is HTTP_400 or reply == "" else reply


# (question, options, prediction (unresolved by exact matching), the judge's replies in order)
JUDGE_CASES = [
    ("What modality is shown", {"A": "CT", "B": "MR", "C": "X-ray", "D": "PET"}, "magnetic resonance", ["B"]),
    ("图中是什么器官？", {"A": "肝脏", "B": "肺", "C": "肾脏"}, "看起来是腰部的器官", ["答案是 C", "C"]),
    ("Which organ", {"A": "liver", "B": "lung"}, "the big one on the right", [API_FAILED, "A"]),
    ("Which organ", {"A": "liver", "B": "lung", "C": "heart", "D": "spleen"}, "hmm", [HTTP_400, "I think D"]),
    ("Grade", {"A": "I", "B": "II", "C": "III"}, "moderate", ["no idea", "maybe", "unsure"]),
    ("Is it benign", {"A": "yes", "B": "no"}, "can't tell", ["Z"]),
    ("Which view", {"A": "AP", "B": "PA", "C": "lateral", "D": "oblique"}, "front", ["The answer is **C**"]),
    ("Which view", {"A": "AP", "B": "PA"}, "Failed to obtain answer via API", ["", API_FAILED, HTTP_400]),
    ("Which plane", {"A": "axial", "B": "coronal", "C": "sagittal"}, "from above", ["A or B", "B", "C"]),
]


def test_judge_prompt_and_options_are_vlmevalkit_s() -> None:
    from medvl.eval.scoring import judge_options, judge_prompt

    ref = load_judge_reference()
    assert judge_options({"A": "CT", "B": "MR"}) == "There are several options: \nA. CT\nB. MR\n"
    for question, options, prediction, _ in JUDGE_CASES:
        option_str = ref.build_option_str(options)
        build = ref.build_prompt_cn if ref.cn_string(question) else ref.build_prompt
        assert judge_prompt(question, options, prediction) == build(question, option_str, prediction)
    assert judge_prompt("图中是什么器官？", {"A": "肝脏"}, "x").startswith("你是一个帮助我匹配答案")


def load_judge_reference():
    spec = importlib.util.spec_from_file_location("vlmevalkit_judge_reference", JUDGE_REFERENCE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.can_infer = load_reference().can_infer
    return module


def test_judge_fallback_agrees_with_vlmevalkit(monkeypatch) -> None:
    """The same scripted judge replies through VLMEvalKit's extract_answer_from_item and through
    medvl's judge (over HTTP): same prompts, same number of tries, same verdicts; where all three
    tries fail both pick at random among the options and Z."""
    from medvl.eval.scoring import JUDGE_RANDOM_LOG, judge_prompt, judge_unresolved
    from medvl.llm import LLMClient

    monkeypatch.delenv("VERBOSE", raising=False)
    ref = load_judge_reference()
    script = {judge_prompt(q, o, p): replies for q, o, p, replies in JUDGE_CASES}
    assert len(script) == len(JUDGE_CASES)
    model = _ScriptedModel(script)
    expected = []
    for i, (question, options, prediction, _) in enumerate(JUDGE_CASES):
        item = pd.Series({"question": question, "prediction": prediction, **options})
        expected.append(ref.extract_answer_from_item(model, item))
        assert extract_choice(prediction, options) is None, i  # every case reaches the judge
    with serve_in_thread(ScriptedJudge(script)) as server:
        rows = [{"id": str(i), "kind": "mc", "question": q, "options": o, "answer": "A", "prediction": p}
                for i, (q, o, p, _) in enumerate(JUDGE_CASES)]  # fmt: skip
        assert judge_unresolved(rows, LLMClient(server.url, max_retries=0), "judge") == len(JUDGE_CASES)
    assert Counter(server.prompts) == Counter(model.prompts)  # same prompts, each as often
    for row, want, (_, options, _, replies) in zip(rows, expected, JUDGE_CASES, strict=True):
        if "randomly" in want["log"]:
            assert row["judge_log"] == JUDGE_RANDOM_LOG and row["judge"] in [*options, "Z"]
            assert len(replies) == 3
        else:
            assert row["judge"] == want["opt"] and "judge_log" not in row, (row, want)
    assert [r["judge"] for r in rows][:4] == ["B", "C", "A", "D"]
    # The random pick is seeded with the question id: re-scoring gives the same verdict.
    again = [dict(r, prediction=r["prediction"]) for r in rows]
    for r in again:
        r.pop("judge"), r.pop("judge_log", None)
    unsure = {judge_prompt(q, o, p): ["?"] * 3 for q, o, p, _ in JUDGE_CASES}
    with serve_in_thread(ScriptedJudge(unsure)) as server:
        judge_unresolved(again, LLMClient(server.url), "judge")
    randoms = [i for i, r in enumerate(rows) if "judge_log" in r]
    assert randoms and all(again[i]["judge"] == rows[i]["judge"] for i in randoms)
