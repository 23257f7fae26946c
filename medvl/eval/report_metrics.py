"""Report-generation metrics: the COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D) on raw
and cleaned text, corpus BLEU with a bootstrap interval, degeneracy checks, the two text baselines,
and the model-based clinical metrics (F1-CheXbert, F1-RadGraph, BERTScore) from local files only.

What each number measures is in docs/eval.md, "Report generation".
"""

from __future__ import annotations

import os
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from medvl.errors import InputError
from medvl.eval.radiology import clean_report
from medvl.eval.stats import BOOTSTRAP_SEED as STATS_SEED
from medvl.eval.stats import indexed_interval, mean_interval, resampled_interval

BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 12345  # sacreBLEU's default seed, so the interval matches `sacrebleu --confidence`
# METEOR's interval costs one pass of the jar over n statistics lines per resample, ~80 us of Java CPU
# a line (measured: 1,000 resamples of 100 reports took 7.9 s of the jar's CPU, 8.6 s wall; 14-17 s wall
# on the shared 2-core machine at load 5). Reports are scored for three systems on raw and cleaned
# text, six intervals, and the time grows with n (MIMIC-CXR's 3,858 test reports: ~5 min an interval
# at 1,000), so METEOR takes the first 500 of the resamples the other intervals use: half the cost.
METEOR_BOOTSTRAP_SAMPLES = 500


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


# ---------------------------------------------------------------- tokenisation for the COCO scorers

# pycocoevalcap's PTBTokenizer drops these tokens; the brackets it writes as -LRB- etc. are lower-cased
# by its -lowerCase flag, miss this list and stay in the text (a quirk that is reproduced below).
_PTB_DROPPED = set(".?!,:;-'\"`")
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_PTB_TOKEN = re.compile(
    r"""
     [a-z](?:\.[a-z])+\.?            # abbreviations: e.g. a.m.
    |(?:dr|mr|mrs|ms|vs|st)\.(?=\s)  # titles keep their dot
    |\d+(?:[.,:]\d+)+                # numbers with separators: 1.5 10:30 1,000 (a unit after them splits)
    |\d+(?:[a-z_]\w*)?               # integers, letters joined: 30x25 3x4mm
    |\w+(?:[-/&]\w+)*(?=n't)         # the word before n't
    |n't
    |'(?:s|re|ve|ll|d|m)\b           # clitics
    |\w+(?:[-/&.]\w+)*               # words, hyphenated and slashed: x-ray and/or svc/right
    |\.\.\.|--|\S
    """,
    re.VERBOSE,
)


def python_ptb_tokenize(text: str) -> str:
    """A pure-Python stand-in for pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1 with
    `-preserveLines -lowerCase`, then punctuation tokens dropped): lower-case; abbreviations, numbers
    ("1.5", "10:30"), hyphenated and slashed words and "n't"/"'s" clitics kept as tokens; other
    punctuation split off and `. ? ! , : ; - ' " \\`` dropped; brackets kept as -lrb- -rrb- -lsb- ...
    tests/test_report_generation.py checks it against the Java tokenizer on report sentences."""
    tokens = (_PTB_BRACKETS.get(t, t) for t in _PTB_TOKEN.findall(text.lower()))
    return " ".join(t for t in tokens if not set(t) <= _PTB_DROPPED)


def _java() -> bool:
    return shutil.which("java") is not None


def java_ptb_tokenize(texts: list[str]) -> list[str]:
    """pycocoevalcap's PTBTokenizer (needs Java) over `texts`; empty texts stay empty (the tokenizer
    would drop their lines and misalign the rest)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    keep = {i: t for i, t in enumerate(texts) if t.strip()}
    done = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in keep.items()}) if keep else {}
    return [done[i][0] if i in done else "" for i in range(len(texts))]


def choose_tokenizer() -> str:
    """ "ptb" (Java's PTBTokenizer, the COCO caption standard) when Java runs it, else "python"."""
    if not _java():
        return "python"
    try:
        java_ptb_tokenize(["probe."])
    except (OSError, KeyError, ValueError):  # no permission for its temporary file, a broken JVM
        return "python"
    return "ptb"


# ---------------------------------------------------------------- COCO metrics and sacreBLEU


def corpus_bleu_interval(
    refs: list[str], hyps: list[str], *, tokenize: str, lowercase: bool, n: int = BOOTSTRAP_SAMPLES
) -> dict:
    """sacreBLEU corpus BLEU and a 95% percentile bootstrap interval over reports (`n` resamples of
    the reports with replacement, seed :data:`BOOTSTRAP_SEED`): each report's n-gram statistics are
    taken once and summed per resample, as sacreBLEU's own bootstrap does."""
    from sacrebleu.metrics import BLEU

    bleu = BLEU(tokenize=tokenize, lowercase=lowercase, effective_order=True)
    stats = np.array(
        [
            [s.sys_len, s.ref_len, *s.counts, *s.totals]
            for s in (bleu.sentence_score(h, [r]) for h, r in zip(hyps, refs, strict=True))
        ],
        dtype=np.int64,
    )

    def score(rows: np.ndarray) -> float:
        total = rows.sum(0)
        return BLEU.compute_bleu(
            correct=total[2:6].tolist(),
            total=total[6:10].tolist(),
            sys_len=int(total[0]),
            ref_len=int(total[1]),
            smooth_method="exp",
        ).score

    corpus = BLEU(tokenize=tokenize, lowercase=lowercase)
    point = corpus.corpus_score(hyps, [refs]).score
    if abs(point - score(stats)) > 1e-6:  # the resamples must be sums of exactly sacreBLEU's statistics
        raise RuntimeError(f"per-report BLEU statistics give {score(stats)}, sacreBLEU {point}")
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    resampled = [score(stats[rng.integers(0, len(stats), len(stats))]) for _ in range(n)]
    lo, hi = np.percentile(resampled, [2.5, 97.5])
    return {
        "bleu": point,
        "ci95": [float(lo), float(hi)],
        "bootstrap": {"samples": n, "seed": BOOTSTRAP_SEED},
        "signature": corpus.get_signature().format(),
    }


class MeteorJar:
    """pycocoevalcap's METEOR 1.5 jar (Java) in its `-stdio` mode, one process for every call. A
    `SCORE` line aligns one report with its reference and returns the segment's statistics line; an
    `EVAL` over statistics lines pools them and returns each segment's score and then the corpus
    score. So each report is aligned once, and a bootstrap resample is one `EVAL` over the resampled
    statistics lines (no re-alignment)."""

    def __init__(self) -> None:
        from pycocoevalcap.meteor.meteor import Meteor

        self.jar = Meteor()  # starts the JVM (~10 s here)

    def statistics(self, refs: list[str], hyps: list[str]) -> list[str]:
        with self.jar.lock:
            return [self.jar._stat(h, [r]) for r, h in zip(refs, hyps, strict=True)]

    def evaluate(self, stats: list[str]) -> tuple[float, list[float]]:
        """(corpus score, each segment's score) of statistics lines."""
        proc = self.jar.meteor_p
        with self.jar.lock:
            proc.stdin.write(("EVAL ||| " + " ||| ".join(stats) + "\n").encode())
            proc.stdin.flush()
            each = [float(proc.stdout.readline()) for _ in stats]
            return float(proc.stdout.readline()), each

    def score(
        self,
        refs: list[str],
        hyps: list[str],
        samples: int = METEOR_BOOTSTRAP_SAMPLES,
        seed: int = STATS_SEED,
    ) -> tuple[float, list[float], list[float]]:
        """Corpus METEOR, each report's METEOR, and the 95% percentile-bootstrap interval of the
        corpus score over the reports (the resamples of :mod:`medvl.eval.stats`, seed `seed`)."""
        stats = self.statistics(refs, hyps)
        point, each = self.evaluate(stats)
        ci = indexed_interval(
            len(stats), lambda idx: self.evaluate([stats[i] for i in idx])[0], samples=samples, seed=seed
        )
        return point, each, ci

    def close(self) -> None:
        self.jar.meteor_p.kill()  # its __del__ would wait on a lock a failed call may hold
        self.jar.meteor_p.wait()


def coco_bleu_intervals(gts: dict, res: dict, point: list[float]) -> list[list[float]]:
    """95% bootstrap intervals of pycocoevalcap's corpus BLEU-1..4 over reports (:mod:`medvl.eval.stats`):
    each report's statistics (hypothesis length, its closest reference length, n-gram guesses and
    matches) are taken once from pycocoevalcap's own scorer and summed per resample, with its formula
    (its `tiny`/`small` constants included). Checked to reproduce `point` on the whole set."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    scorer = BleuScorer(n=4)
    for i in gts:
        scorer += (res[i][0], gts[i])
    rows = []
    for comps in scorer.ctest:
        reflen = scorer._single_reflen(comps["reflen"], "closest", comps["testlen"])
        rows.append([comps["testlen"], reflen, *comps["guess"], *comps["correct"]])
    stats = np.array(rows, dtype=float)
    n = len(stats)

    def corpus_bleu(means: np.ndarray) -> np.ndarray:
        totals = np.atleast_2d(means) * n
        tiny, small = 1e-15, 1e-9
        precisions = (totals[:, 6:10] + tiny) / (totals[:, 2:6] + small)
        bleus = np.cumprod(precisions, axis=1) ** (1 / np.arange(1, 5))
        ratio = (totals[:, :1] + tiny) / (totals[:, 1:2] + small)
        return bleus * np.where(ratio < 1, np.exp(1 - 1 / ratio), 1.0)

    whole = corpus_bleu(stats.mean(0))[0]
    if not np.allclose(whole, point, rtol=1e-9, atol=1e-12):
        raise RuntimeError(f"per-report BLEU statistics give {whole.tolist()}, pycocoevalcap {point}")
    return resampled_interval(stats, corpus_bleu)


class TextMetrics:
    """The COCO caption scorers (pycocoevalcap) on raw text (PTB-tokenised) and on cleaned text
    (:func:`clean_report`, whitespace tokens as in R2Gen), plus sacreBLEU with its interval. One
    METEOR process (Java, ~30 s to start) serves every call; `close()` ends it."""

    def __init__(self, meteor: bool = True) -> None:
        self.tokenizer = choose_tokenizer()
        self.meteor_note = None if _java() else "not run: no Java"
        if not meteor and self.meteor_note is None:
            self.meteor_note = "not run: switched off"
        self._meteor = None

    def info(self) -> dict:
        return {
            "pycocoevalcap": package_version("pycocoevalcap"),
            "sacrebleu": package_version("sacrebleu"),
            "raw_tokenizer": {
                "ptb": "pycocoevalcap PTBTokenizer (Stanford CoreNLP 3.4.1, Java), punctuation dropped",
                "python": "medvl's pure-Python PTBTokenizer stand-in (no Java here)",
            }[self.tokenizer],
            "cleaned_tokenizer": "clean_report(), then whitespace (R2Gen)",
            "meteor": self.meteor_note
            or f"METEOR 1.5 (pycocoevalcap's jar, Java); interval over {METEOR_BOOTSTRAP_SAMPLES} resamples",
            "cider": "CIDEr-D (pycocoevalcap; document frequencies from this set's references)",
            "rouge_l": "ROUGE-L F (pycocoevalcap, beta 1.2), mean over reports",
        }

    def tokenize(self, texts: list[str]) -> list[str]:
        if self.tokenizer == "ptb":
            return java_ptb_tokenize(texts)
        return [python_ptb_tokenize(t) for t in texts]

    def _coco(self, refs: list[str], hyps: list[str]) -> tuple[dict, list[dict]]:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        gts = {i: [r] for i, r in enumerate(refs)}
        res = {i: [h] for i, h in enumerate(hyps)}
        bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
        rouge, rouge_each = Rouge().compute_score(gts, res)
        cider, cider_each = Cider().compute_score(gts, res)
        out = {f"bleu_{k + 1}": float(bleu[k]) for k in range(4)}
        out.update(rouge_l=float(rouge), cider=float(cider))
        out["ci95"] = {
            **{f"bleu_{k + 1}": ci for k, ci in enumerate(coco_bleu_intervals(gts, res, bleu))},
            "rouge_l": mean_interval(list(rouge_each)),
            "cider": mean_interval(list(cider_each)),
            "meteor": None,
        }
        each = [
            {"bleu_4": float(bleu_each[3][i]), "rouge_l": float(rouge_each[i]), "cider": float(cider_each[i])}
            for i in range(len(refs))
        ]
        out["meteor"] = None
        if self.meteor_note is None:
            if self._meteor is None:
                self._meteor = MeteorJar()
            out["meteor"], meteor_each, out["ci95"]["meteor"] = self._meteor.score(refs, hyps)
            for row, m in zip(each, meteor_each, strict=True):
                row["meteor"] = m
        return out, each

    def score(self, refs: list[str], hyps: list[str]) -> tuple[dict, list[dict]]:
        """{"raw": {...}, "cleaned": {...}} and each report's cleaned-text scores."""
        raw, _ = self._coco(self.tokenize(refs), self.tokenize(hyps))
        raw["sacrebleu"] = corpus_bleu_interval(refs, hyps, tokenize="13a", lowercase=True)
        clean_refs, clean_hyps = [clean_report(t) for t in refs], [clean_report(t) for t in hyps]
        cleaned, each = self._coco(clean_refs, clean_hyps)
        cleaned["sacrebleu"] = corpus_bleu_interval(clean_refs, clean_hyps, tokenize="none", lowercase=False)
        return {"raw": raw, "cleaned": cleaned}, each

    def close(self) -> None:
        if self._meteor is not None:
            self._meteor.close()
            self._meteor = None


# ---------------------------------------------------------------- degeneracy and baselines


def _words(cleaned: str) -> list[str]:
    return [w for w in cleaned.split() if w != "."]


def distinct_n(texts: list[str], n: int) -> float | None:
    """Distinct n-grams / all n-grams over the texts (cleaned, sentence dots left out)."""
    grams = [tuple(w[i : i + n]) for w in map(_words, texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def degeneracy(refs: list[str], hyps: list[str]) -> dict:
    """Signs of a collapsed generator, on cleaned text: the share of generated reports that repeat
    another one, the most repeated report, distinct-1/2 (references' beside them), empty reports, and
    generated length over reference length (mean of per-report ratios, and totals)."""
    clean_h = [clean_report(h) for h in hyps]
    clean_r = [clean_report(r) for r in refs]
    counts = Counter(clean_h)
    top, top_n = counts.most_common(1)[0] if counts else ("", 0)
    len_h = [len(_words(h)) for h in clean_h]
    len_r = [len(_words(r)) for r in clean_r]
    ratios = [h / r for h, r in zip(len_h, len_r, strict=True) if r]
    return {
        "n": len(hyps),
        "identical_share": (len(hyps) - len(counts)) / len(hyps) if hyps else None,
        "unique_reports": len(counts),
        "most_repeated": {"text": top, "count": top_n},
        "empty": sum(1 for h in clean_h if not h),
        "distinct_1": distinct_n(clean_h, 1),
        "distinct_2": distinct_n(clean_h, 2),
        "reference_distinct_1": distinct_n(clean_r, 1),
        "reference_distinct_2": distinct_n(clean_r, 2),
        "mean_length_ratio": float(np.mean(ratios)) if ratios else None,
        "total_length_ratio": sum(len_h) / sum(len_r) if sum(len_r) else None,
        "mean_words": float(np.mean(len_h)) if len_h else None,
        "reference_mean_words": float(np.mean(len_r)) if len_r else None,
    }


def most_frequent_report(train_texts: list[str]) -> tuple[str, int]:
    """The training report whose cleaned text is the most frequent (ties: the first seen), as written
    (its first occurrence), and how many training reports share it."""
    cleaned = [clean_report(t) for t in train_texts]
    best, count = Counter(cleaned).most_common(1)[0]
    return train_texts[cleaned.index(best)], count


def nearest_neighbours(train: np.ndarray, query: np.ndarray) -> np.ndarray:
    """For each query row, the index of the train row of highest cosine similarity."""
    a = train / np.maximum(np.linalg.norm(train, axis=1, keepdims=True), 1e-12)
    b = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
    return np.asarray((b @ a.T).argmax(1))


# ---------------------------------------------------------------- model-based clinical metrics


@contextmanager
def offline_hub() -> Iterator[None]:
    """No Hugging Face Hub access inside: HF_HUB_OFFLINE for code that reads the environment, and
    huggingface_hub's constant, which was read once when it was imported. Restored on exit."""
    import huggingface_hub.constants as hub

    old_env, old_const = os.environ.get("HF_HUB_OFFLINE"), hub.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], hub.HF_HUB_OFFLINE = "1", True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


CHEXBERT_CONDITIONS = (
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
    "No Finding",
)
CHEXBERT_FIVE = ("Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion")


class CheXbert:
    """The CheXbert labeller (Smit et al. 2020): BERT-base with 13 four-way heads (blank, positive,
    negative, uncertain) and one two-way head (No Finding), loaded from its released checkpoint
    `chexbert.pth` (`model_state_dict`, keys prefixed `module.`) and a local folder with
    bert-base-uncased's `config.json` and tokenizer. Written here rather than taken from the
    `f1chexbert` package because that one downloads its checkpoint and tokenizer at run time."""

    def __init__(self, checkpoint: Path, bert_folder: Path, device: str = "cpu") -> None:
        import torch
        from transformers import AutoTokenizer, BertConfig, BertModel

        with offline_hub():
            config = BertConfig.from_pretrained(bert_folder, local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(bert_folder, local_files_only=True)
        self.bert = BertModel(config)
        self.heads = torch.nn.ModuleList(
            [torch.nn.Linear(config.hidden_size, 4) for _ in range(13)]
            + [torch.nn.Linear(config.hidden_size, 2)]
        )
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = {k.removeprefix("module."): v for k, v in state.get("model_state_dict", state).items()}
        heads = {
            k.removeprefix("linear_heads."): v for k, v in state.items() if k.startswith("linear_heads.")
        }
        bert = {k.removeprefix("bert."): v for k, v in state.items() if k.startswith("bert.")}
        if not heads or not bert:
            raise InputError(
                str(checkpoint), "model_state_dict", "no bert.* and linear_heads.* weights (not CheXbert)"
            )
        try:
            self.heads.load_state_dict(heads)
            missing, unexpected = self.bert.load_state_dict(bert, strict=False)
        except RuntimeError as e:
            raise InputError(
                str(checkpoint), "model_state_dict", f"does not fit {bert_folder}'s config ({e})"
            ) from None
        # position_ids is a buffer older checkpoints store and newer transformers rebuild
        if [k for k in missing if "position_ids" not in k] or [
            k for k in unexpected if "position_ids" not in k
        ]:
            raise InputError(str(checkpoint), "model_state_dict", f"BERT weights missing: {missing[:3]}")
        self.device = device
        self.bert.to(device).eval()
        self.heads.to(device).eval()

    def labels(self, texts: list[str], batch_size: int = 16) -> np.ndarray:
        """[n, 14] 0/1: 1 where CheXbert labels the condition positive or uncertain (the usual
        report-generation reading: uncertain mentions count as mentioned)."""
        import torch

        out = []
        for start in range(0, len(texts), batch_size):
            batch = [" ".join(t.split()) for t in texts[start : start + batch_size]]
            enc = self.tokenizer(batch, truncation=True, max_length=512, padding=True, return_tensors="pt")
            with torch.inference_mode():
                cls = self.bert(**enc.to(self.device)).last_hidden_state[:, 0]
                classes = torch.stack([h(cls).argmax(-1) for h in self.heads], dim=1)
            out.append(((classes == 1) | (classes == 3)).int().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 14), dtype=int)


def label_f1(ref: np.ndarray, hyp: np.ndarray, names: tuple[str, ...]) -> dict:
    """Micro and macro F1 of 0/1 label matrices, references as the truth (a condition that neither
    side mentions has F1 0 in the macro mean, as scikit-learn's default)."""
    tp = (ref & hyp).sum(0)
    fp = ((1 - ref) & hyp).sum(0)
    fn = (ref & (1 - hyp)).sum(0)
    per = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    denom = 2 * tp.sum() + fp.sum() + fn.sum()
    return {
        "micro_f1": float(2 * tp.sum() / denom) if denom else 0.0,
        "macro_f1": float(per.mean()),
        "per_condition": {n: float(f) for n, f in zip(names, per, strict=True)},
    }


@dataclass
class ClinicalOptions:
    """Local model files for the clinical metrics; a metric without its files is skipped with a note.
    Nothing is downloaded."""

    chexbert: Path | None = None  # CheXbert's chexbert.pth
    chexbert_bert: Path | None = None  # folder: bert-base-uncased config.json + tokenizer files
    radgraph: Path | None = None  # folder holding `<radgraph_type>/` as the radgraph package unpacks it
    radgraph_type: str = "radgraph"  # radgraph, radgraph-xl, modern-radgraph-xl, echograph
    bertscore_model: Path | None = None  # a Hugging Face model folder (e.g. roberta-large, saved)
    bertscore_layer: int | None = None  # default: bert-score's tuned layer for a known name, else the last
    bertscore_baseline: Path | None = None  # bert-score's rescale baseline TSV for that model


class ClinicalMetrics:
    """F1-CheXbert, F1-RadGraph and BERTScore, each from local files or not at all."""

    def __init__(self, options: ClinicalOptions, device: str = "cpu") -> None:
        self.options, self.device = options, device
        self.notes: dict[str, str] = {}
        self.models: dict[str, dict] = {}
        self._chexbert = self._radgraph = self._bertscore = None
        o = options
        if o.chexbert and o.chexbert_bert:
            self._chexbert = CheXbert(Path(o.chexbert), Path(o.chexbert_bert), device)
            self.models["f1_chexbert"] = {"checkpoint": str(o.chexbert), "bert": str(o.chexbert_bert)}
        else:
            self.notes["f1_chexbert"] = (
                "not run: give chexbert=<chexbert.pth> and chexbert_bert=<bert folder>"
            )
        if o.radgraph:
            self._load_radgraph()
        else:
            self.notes["f1_radgraph"] = "not run: give radgraph=<folder with the unpacked model>"
        if o.bertscore_model:
            self._load_bertscore()
        else:
            self.notes["bertscore"] = "not run: give bertscore_model=<model folder>"

    def _load_radgraph(self) -> None:
        o = self.options
        try:
            from radgraph import F1RadGraph
        except ImportError:
            self.notes["f1_radgraph"] = (
                "not run: the radgraph package is not installed (pip install radgraph)"
            )
            return
        if not (Path(o.radgraph) / o.radgraph_type).is_dir():
            raise InputError(str(o.radgraph), "radgraph", f"no {o.radgraph_type}/ model folder in it")
        with offline_hub():
            self._radgraph = F1RadGraph(
                reward_level="all",
                model_type=o.radgraph_type,
                model_cache_dir=str(o.radgraph),
                tokenizer_cache_dir=str(o.radgraph),
                cuda=0 if self.device.startswith("cuda") else -1,
            )
        self.models["f1_radgraph"] = {
            "model_type": o.radgraph_type,
            "folder": str(o.radgraph),
            "radgraph": package_version("radgraph"),
        }

    def _load_bertscore(self) -> None:
        from bert_score import BERTScorer
        from bert_score.utils import model2layers
        from transformers import AutoConfig

        o = self.options
        folder = Path(o.bertscore_model)
        with offline_hub():
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
            layer, how = o.bertscore_layer, "given"
            if layer is None and folder.name in model2layers:
                layer, how = model2layers[folder.name], f"bert-score's tuned layer for {folder.name}"
            if layer is None:
                layer, how = config.num_hidden_layers, "the last layer (no tuned layer known for this folder)"
            self._bertscore = BERTScorer(
                model_type=str(folder),
                num_layers=layer,
                lang="en",
                rescale_with_baseline=o.bertscore_baseline is not None,
                baseline_path=str(o.bertscore_baseline) if o.bertscore_baseline else None,
                device=self.device,
            )
        tok = self._bertscore._tokenizer
        if tok.model_max_length > 100_000:  # a tokenizer saved without its limit: the model's positions
            tok.model_max_length = min(getattr(config, "max_position_embeddings", 512), 512)
        self.models["bertscore"] = {
            "model": str(folder),
            "model_type": config.model_type,
            "layer": layer,
            "layer_chosen": how,
            "idf": False,
            "rescaled": o.bertscore_baseline is not None,
            "baseline": str(o.bertscore_baseline) if o.bertscore_baseline else None,
            "hash": self._bertscore.hash,
            "bert_score": package_version("bert-score"),
        }

    def info(self) -> dict:
        return {"models": self.models, "not_run": self.notes}

    def score(self, refs: list[str], hyps: list[str]) -> dict:
        """The clinical metrics on raw text (the models were trained on reports as written)."""
        out: dict = {}
        if self._chexbert is not None:
            ref, hyp = self._chexbert.labels(refs), self._chexbert.labels(hyps)
            idx = [CHEXBERT_CONDITIONS.index(c) for c in CHEXBERT_FIVE]
            out["f1_chexbert"] = {
                "14": label_f1(ref, hyp, CHEXBERT_CONDITIONS),
                "5": label_f1(ref[:, idx], hyp[:, idx], CHEXBERT_FIVE),
            }
        if self._radgraph is not None:
            with offline_hub():
                mean, _, _, _ = self._radgraph(refs=refs, hyps=hyps)
            out["f1_radgraph"] = dict(zip(("simple", "partial", "complete"), map(float, mean), strict=True))
        if self._bertscore is not None:
            with offline_hub():
                p, r, f = self._bertscore.score(hyps, refs)
            out["bertscore"] = {
                "precision": float(p.mean()),
                "recall": float(r.mean()),
                "f1": float(f.mean()),
            }
        return out
