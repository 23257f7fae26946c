"""Statistics for evaluation reports: percentile-bootstrap intervals over questions, paired
differences of two runs on the same questions, and McNemar's test.

Every interval here is a 95% percentile bootstrap: the questions are resampled with replacement
:data:`BOOTSTRAP_SAMPLES` times from a generator seeded with :data:`BOOTSTRAP_SEED`, the statistic is
computed on each resample, and the 2.5th and 97.5th percentiles of those values are the interval.
A fixed seed makes a report a function of its prediction file: scoring it again gives the same
interval to the last digit. A paired interval resamples the *same* questions for both runs, so the
questions' shared difficulty cancels (a much narrower interval than two separate ones suggest).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
# McNemar: the exact binomial test below this many discordant pairs, the chi-square approximation
# (with continuity correction) from it on; 25 is the usual threshold (e.g. statsmodels' advice).
MCNEMAR_EXACT_BELOW = 25

BOOTSTRAP_INFO = {
    "method": "percentile bootstrap over questions",
    "samples": BOOTSTRAP_SAMPLES,
    "seed": BOOTSTRAP_SEED,
    "confidence": CONFIDENCE,
}


def resample_indices(
    n: int, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED
) -> Iterator[np.ndarray]:
    """The bootstrap's resamples of `n` questions, in blocks of rows (resamples x n indices, drawn with
    replacement). Every interval draws its resamples here, so with the same seed resample k picks the
    same questions for every metric, and fewer samples are the first ones of more."""
    rng = np.random.default_rng(seed)
    # Blocks keep the index matrix small on large benchmarks (~8 MB per block at n=10k).
    chunk = max(1, 1_000_000 // max(n, 1))
    for start in range(0, samples, chunk):
        yield rng.integers(0, n, (min(samples, start + chunk) - start, n))


def _resampled_means(values: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """Mean of `values` (questions on axis 0) on each of `samples` resamples of the questions."""
    return np.concatenate([values[idx].mean(axis=1) for idx in resample_indices(len(values), samples, seed)])


def _percentiles(values: np.ndarray) -> list[float]:
    tail = 100 * (1 - CONFIDENCE) / 2
    lo, hi = np.percentile(values, [tail, 100 - tail], axis=0)
    return [float(lo), float(hi)]


def indexed_interval(
    n: int,
    statistic: Callable[[np.ndarray], float],
    *,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> list[float]:
    """95% percentile-bootstrap interval of a statistic of the questions a resample picks:
    `statistic(indices)` for each resample's `n` indices. For a statistic that is no function of
    per-question means (METEOR's corpus score, which its jar computes from pooled alignment
    statistics); one that is goes through :func:`resampled_interval`, vectorised."""
    values = [statistic(idx) for block in resample_indices(n, samples, seed) for idx in block]
    return _percentiles(np.asarray(values, dtype=float))


def mean_interval(
    values: Sequence[float], *, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED
) -> list[float] | None:
    """95% percentile-bootstrap interval [low, high] of the mean of per-question `values`
    (1.0/0.0 for right/wrong: an accuracy); None for no questions."""
    if len(values) == 0:
        return None
    return _percentiles(_resampled_means(np.asarray(values, dtype=float), samples, seed))


def resampled_interval(
    values: np.ndarray,
    statistic: Callable[[np.ndarray], np.ndarray],
    *,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> list[list[float]]:
    """95% percentile-bootstrap intervals of a statistic that is a function of the per-question
    means of several columns (`values`: questions x columns; e.g. a corpus BLEU from per-report n-gram
    counts). `statistic` maps an array of mean rows (resamples x columns) to resamples x outputs;
    returns one [low, high] per output."""
    means = _resampled_means(np.asarray(values, dtype=float), samples, seed)
    results = np.asarray(statistic(means), dtype=float).reshape(samples, -1)
    tail = 100 * (1 - CONFIDENCE) / 2
    lo, hi = np.percentile(results, [tail, 100 - tail], axis=0)
    return [[float(a), float(b)] for a, b in zip(lo, hi, strict=True)]


def paired_difference(
    a: Sequence[float], b: Sequence[float], *, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED
) -> dict:
    """Mean of a - b over paired questions and its 95% paired-bootstrap interval (both runs
    resampled on the same question indices)."""
    if len(a) != len(b):
        raise ValueError(f"paired values differ in length: {len(a)} and {len(b)}")
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if not len(diff):
        return {"n": 0, "difference": None, "ci95": None}
    return {
        "n": len(diff),
        "difference": float(diff.mean()),
        "ci95": _percentiles(_resampled_means(diff, samples, seed)),
    }


def mcnemar(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> dict:
    """McNemar's test of two runs' right/wrong verdicts on the same questions. Only the discordant
    questions count: `a_only` (a right, b wrong) and `b_only`. Under the null hypothesis (same
    accuracy) each discordant question is a fair coin. Fewer than :data:`MCNEMAR_EXACT_BELOW`
    discordant pairs: the exact two-sided binomial test (scipy.stats.binomtest); otherwise the
    chi-square statistic (|a_only - b_only| - 1)^2 / (a_only + b_only) with one degree of freedom.
    No discordant pair: p = 1."""
    from scipy import stats

    if len(a_correct) != len(b_correct):
        raise ValueError(f"paired verdicts differ in length: {len(a_correct)} and {len(b_correct)}")
    a_only = sum(1 for x, y in zip(a_correct, b_correct, strict=True) if x and not y)
    b_only = sum(1 for x, y in zip(a_correct, b_correct, strict=True) if y and not x)
    discordant = a_only + b_only
    out = {"a_only": a_only, "b_only": b_only, "discordant": discordant}
    if discordant == 0:
        return out | {"method": "no discordant pairs", "statistic": None, "p_value": 1.0}
    if discordant < MCNEMAR_EXACT_BELOW:
        p = stats.binomtest(min(a_only, b_only), discordant, 0.5).pvalue
        return out | {"method": "exact binomial", "statistic": float(min(a_only, b_only)), "p_value": p}
    chi2 = (abs(a_only - b_only) - 1) ** 2 / discordant
    return out | {
        "method": "chi-square with continuity correction",
        "statistic": float(chi2),
        "p_value": float(stats.chi2.sf(chi2, 1)),
    }
