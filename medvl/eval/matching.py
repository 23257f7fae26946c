"""Which option a free-text multiple-choice answer picks: the same decisions as VLMEvalKit's
exact-matching chain, `can_infer` in `vlmeval/utils/matching_util.py` at commit
e8e78f05f3080fe28154f2130321f17951c3be94 (2026-08-18; the file last changed in 2cf2a36, 2026-06-25),
which `vlmeval/dataset/utils/multiple_choice.py` runs on every prediction before it asks a judge.

Published multiple-choice numbers are computed with that chain, so medvl follows it decision for
decision, quirks included, rather than improving on it: a "better" matcher would make medvl's numbers
incomparable with the tables they are set beside. tests/test_matching.py runs VLMEvalKit's own code
(vendored in tests/data) against this module on several thousand answers and requires 100% agreement.

The rules, in order (:func:`extract_choice`):

1. Letter stage (VLMEvalKit's `can_infer_option`):
   a. an answer containing "Failed to obtain answer via API" skips the letter stage;
   b. an answer containing a refusal phrase (:data:`REFUSALS`) is refused: "Z";
   c. after each of `.()[],:;!*#{}` becomes a space, the answer is split into tokens. When exactly
      one option letter stands alone as a token (case-sensitive: the article "a" is not option A),
      and its first occurrence is among the last four tokens, that letter is the choice. When no
      option letter stands alone but a lone "Z" does, the answer is refused: "Z";
   d. else the first "answer is X" phrase (case-insensitive, X one of A-D, optionally in markdown
      bold: "The correct answer is **C**. Here's why...") gives X when X is an option.
2. Text stage (`can_infer_text`), only for answers at most twice as long as all option texts
   together: the one option whose text occurs in the answer (case-insensitive). An option inside
   another ("CT" / "CT with contrast") matches both and resolves nothing.
3. Else unresolved (None): scored wrong, or sent to the LLM judge when one is configured.

VLMEvalKit also consults the environment variable VERBOSE: when it is set, an answer of more than
three tokens with a lone "A" in it skips rule 1c/1d. VLMEvalKit never sets it itself; medvl matches
its default (unset) and does not read the environment.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping

VLMEVALKIT_COMMIT = "e8e78f05f3080fe28154f2130321f17951c3be94"
VLMEVALKIT_COMMIT_DATE = "2026-08-18"
# One line naming the matching for reports.
MATCHING_VERSION = (
    f"VLMEvalKit exact matching (vlmeval/utils/matching_util.py can_infer) at commit "
    f"{VLMEVALKIT_COMMIT[:12]} ({VLMEVALKIT_COMMIT_DATE})"
)

REFUSED = "Z"
# Answers containing one of these refuse the question (VLMEvalKit's list, verbatim).
REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
# VLMEvalKit's API wrappers answer with this text when a request failed; it is no answer.
API_FAILURE = "Failed to obtain answer via API"

_SEPARATORS = str.maketrans({c: " " for c in ".()[],:;!*#{}"})
# A lone letter counts only among the last tokens (its index > number of tokens - 5), so that
# "A 45-year-old man presents with ..." is not read as option A.
_TAIL = 5
# "answer is X". VLMEvalKit's pattern also allows a leading "correct " and trailing "*"s, neither of
# which changes which letter the first match captures. There is no word boundary after the letter:
# "the answer is definitely ..." reads as D, as in VLMEvalKit.
_ANSWER_IS = re.compile(r"answer\s+is\s+\**([a-d])", re.IGNORECASE)
# The text stage is skipped for answers longer than this many times all option texts together: an
# explanation that long mentions option texts in passing.
_TEXT_LENGTH_FACTOR = 2


def _tokens(answer: str) -> list[str]:
    return answer.translate(_SEPARATORS).split()


def choice_by_letter(answer: str, options: Mapping[str, object]) -> str | None:
    """Rule 1 (VLMEvalKit's `can_infer_option`): the letter the answer states, "Z" for a refusal,
    else None."""
    if API_FAILURE in answer:
        return None
    if any(refusal in answer for refusal in REFUSALS):
        return REFUSED
    tokens = _tokens(answer)
    lone = [key for key in options if key in tokens]
    if len(lone) == 1:
        if tokens.index(lone[0]) > len(tokens) - _TAIL:
            return lone[0]
    elif not lone and REFUSED in tokens:
        return REFUSED
    # Reached also when a single lone letter stood too early or several stood alone.
    match = _ANSWER_IS.search(answer)
    if match and match.group(1).upper() in options:
        return match.group(1).upper()
    return None


def choice_by_text(answer: str, options: Mapping[str, object]) -> str | None:
    """Rule 2 (VLMEvalKit's `can_infer_text`): the only option whose text occurs in a short enough
    answer, case-insensitively; else None. Option keys must be capital letters (ValueError)."""
    lowered = answer.lower()
    # The length of the lower-cased answer against the option texts as given, as VLMEvalKit measures.
    if len(lowered) > _TEXT_LENGTH_FACTOR * sum(len(str(text)) for text in options.values()):
        return None
    for key in options:
        if len(key) != 1 or key not in string.ascii_uppercase:
            raise ValueError(f"option key {key!r} is not a capital letter A-Z")
    found = [key for key, text in options.items() if str(text).lower() in lowered]
    return found[0] if len(found) == 1 else None


def extract_choice(answer: object, options: Mapping[str, object]) -> str | None:
    """The option letter a free-text answer picks, "Z" when it refuses, or None when unresolved, by
    VLMEvalKit's exact-matching chain (rules in this module's docstring). `options` maps letters to
    option texts; options a question lacks are left out, as VLMEvalKit drops empty cells (an empty
    text would occur in every answer)."""
    answer = str(answer)
    return choice_by_letter(answer, options) or choice_by_text(answer, options)
