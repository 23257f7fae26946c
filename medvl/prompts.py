"""The text formats every stage shares: the image token, the multiple-choice and short-answer
prompts, the expected multiple-choice reply, and the box syntax.

Training data (synth, the instruction-data generator), evaluation and serving all build their
prompts here, so a model is measured on exactly the format it was trained on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# The placeholder the processor expands into the image's tokens (LLaVA's spelling).
IMAGE_TOKEN = "<image>"
# Option letters, in order. Nine covers every benchmark medvl loads (MMMU has up to nine options);
# VLMEvalKit reads the same letters from its TSV columns.
OPTION_LETTERS = "ABCDEFGHI"
# The LLaVA / VLMEvalKit multiple-choice instruction.
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
# Closed and open questions: LLaVA-1.5's short-answer VQA instruction.
SHORT_INSTRUCTION = "Answer the question using a single word or phrase."
# Boxes are [x0, y0, x1, y1] integers on a 0-1000 grid, whatever the image size (as in Qwen-VL,
# InternVL and GMAI-VL's region data), so a box means the same thing at every resolution.
BOX_SCALE = 1000
BOX_HINT = f"[x0, y0, x1, y1] (0-{BOX_SCALE})"


def lettered(options: Sequence[str]) -> dict[str, str]:
    """Options in order -> {"A": first, "B": second, ...}."""
    if len(options) > len(OPTION_LETTERS):
        raise ValueError(f"{len(options)} options; at most {len(OPTION_LETTERS)} are supported")
    return dict(zip(OPTION_LETTERS, options))


def build_prompt(question: str, options: Mapping[str, str] | Sequence[str] = ()) -> str:
    """Multiple choice (options given): the question, one `X. text` line per option, then
    :data:`MC_INSTRUCTION`. Otherwise the question, then :data:`SHORT_INSTRUCTION`.
    No image token: the chat template or :func:`with_image` places it."""
    opts = options if isinstance(options, Mapping) else lettered(list(options))
    if opts:
        return "\n".join([question.strip(), *(f"{k}. {v}" for k, v in opts.items()), MC_INSTRUCTION])
    return "\n".join([question.strip(), SHORT_INSTRUCTION])


def mc_answer(letter: str, text: str) -> str:
    """The reply a multiple-choice sample is trained to give: the option's text, e.g. ``"MR"``.

    Replying with the letter needs a copy-the-letter circuit that a 5M-parameter model trained for
    minutes on a CPU does not form (measured: letters stay at chance while the option text is often
    right). VLMEvalKit's matching maps an answer that contains exactly one option's text to that
    option, so the text is a valid multiple-choice answer; a real LLM can be trained with
    ``f"{letter}. {text}"`` instead."""
    del letter  # kept in the signature: the one place to switch to lettered replies
    return text


def with_image(text: str) -> str:
    """A first user turn that shows one image before the text (LLaVA's layout)."""
    return f"{IMAGE_TOKEN}\n{text}"


def box_1000(bbox: Sequence[float], width: float, height: float) -> list[int]:
    """Pixel ``[x0, y0, x1, y1]`` -> integers on the 0-1000 grid."""
    return [round(v * BOX_SCALE / (width if i % 2 == 0 else height)) for i, v in enumerate(bbox)]


def format_box(box: Sequence[int]) -> str:
    """A 0-1000 box as it appears in prompts and replies: ``[x0, y0, x1, y1]``."""
    return "[" + ", ".join(str(int(v)) for v in box) + "]"
