"""Does annotation-guided data make a better model? GMAI-VL's central claim, tested at small scale on SLAKE.

Two arms from the same pretrained tiny parts, the same stage config and the same number of optimizer
steps, differing only in their training data:

- arm (a): SLAKE's official train questions (English and Chinese) in LLaVA format;
- arm (b): the same questions plus what `medvl generate` (template backend) writes from SLAKE's train-split
  records (boxes, masks, modality, body region), filtered by `medvl quality` with SLAKE's test split as
  the contamination benchmark, mixed by `medvl mix`.

No test-split image feeds any step except through the official train questions both arms share: curated
records go to the most held-out split that lists their image (configs/cards/slake.yaml), generation and
the vision tower's pretraining read train-split records only, and the quality guard drops any generated
sample whose image matches a test image (its report lists them by hash). Validation is evaluated for
every run; the test split only with `--test`, once, at the end.

    python benchmarks/slake_experiment.py --size full --out runs/slake-experiment --test
    python benchmarks/slake_experiment.py --size ci --out /tmp/slake-ci --test     # a smoke run

Writes report.md, report.json and report.png in --out (docs/slake-experiment.md is the committed one).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "slake-experiment"
CARD = REPO / "configs" / "cards" / "slake.yaml"
DEFAULT_SLAKE = Path(os.environ.get("MEDVL_SHARED_DATA", REPO.parent / "shared" / "data")) / "slake"
ARMS = ("a", "b")
WORKERS = 2  # the data jobs' processes: the 2 CPU cores the full run is sized for
# Answers are short (849 of the 1,061 English test answers are one word, 7 have more than 7): 20 new
# tokens hold them in both languages; batches of 64 answer about 2.5x faster than 16 on 2 cores.
EVAL_BATCH, EVAL_NEW_TOKENS = 64, 20

# full: the 60 minutes on 2 idle CPU cores, fixed before any run (nothing here was tuned): the
# quickstart's pretraining (200 LM steps, 900 vision steps), then as many arm steps as the rest of the
# hour holds. On an idle 2-core machine a step of 32 samples (~3k tokens) of the tiny model takes about
# 1.3 s, so 750 steps an arm is ~17 min each, and evaluation (~8.5k answers of the test splits plus the
# validation split) ~8 min; an earlier run on a machine shared with other jobs fit only 30 steps in 25
# minutes and neither arm learned to answer. ci: a test of the command (a few steps of each arm, a few
# questions), not of the result.
SIZES = {
    "full": dict(records=None, llm_steps=200, vision_steps=900, arm_steps=750, questions=None),
    "ci": dict(records=40, llm_steps=3, vision_steps=3, arm_steps=2, questions=6),
}


def slake_questions(slake: Path, split: str = "train") -> list[dict]:
    """SLAKE's `<split>.json` questions (both languages) as LLaVA samples: the image path relative to the
    SLAKE folder, the question in the prompt `medvl eval` asks it with, the official answer."""
    from medvl.prompts import build_prompt, with_image

    rows = json.loads((slake / f"{split}.json").read_text(encoding="utf-8"))
    return [
        {
            "id": f"slake-{split}-{r['qid']}",
            "image": f"imgs/{r['img_name']}",
            "conversations": [
                {"from": "human", "value": with_image(build_prompt(r["question"]))},
                {"from": "gpt", "value": str(r["answer"]).strip()},
            ],
            "lang": r["q_lang"],
        }
        for r in rows
    ]


def vision_records(kept: list[dict]) -> list[dict]:
    """One labelled record per distinct image of the kept generated samples: the labels the vision tower
    is pretrained to predict (modality, body region, the first boxed or masked label)."""
    seen: dict[str, dict] = {}
    for s in kept:
        if "image" not in s or s["image"] in seen:
            continue
        facts = s["facts"] if isinstance(s["facts"], dict) else json.loads(s["facts"])
        labels = facts.get("labels") or ["none"]
        seen[s["image"]] = {
            "image": s["image"],
            "modality": facts["modality"],
            "body_region": facts["body_region"],
            "label": labels[0],
        }
    return [seen[k] for k in sorted(seen)]


def prepare_data(out: Path, slake: Path, sz: dict, seed: int, log=print) -> dict:
    """curate -> generate (train split) -> quality (test split as benchmark) -> the train questions ->
    one mixture per arm."""
    from medvl.curate.card import load_card
    from medvl.curate.pipeline import curate
    from medvl.data.mix import mix
    from medvl.generate.pipeline import generate
    from medvl.generate.template import TemplateBackend
    from medvl.quality.config import load_thresholds
    from medvl.quality.pipeline import quality

    card = load_card(CARD)
    card.root = str(slake.resolve())
    log("curate: SLAKE by its card (splits test > validation > train)")
    cur = curate([card], out / "curated", workers=WORKERS, limit=sz["records"])
    log("generate: template backend, six formats, English + Chinese, train-split records only")
    gen = generate(
        [out / "curated"], out / "generated", TemplateBackend(), splits=["train"], seed=seed, workers=WORKERS
    )
    log(f"  {gen['kept']} samples from {gen['records']} records")
    log("quality: five dimensions, SLAKE's test split as the contamination benchmark")
    q = quality([out / "generated"], out / "quality", load_thresholds(), benchmarks=[slake], workers=WORKERS)
    log(f"  {q['counts']['kept']} kept, {q['counts']['rejected']} rejected")
    qdir = out / "questions"
    qdir.mkdir(parents=True, exist_ok=True)
    (qdir / "slake_train.json").write_text(json.dumps(slake_questions(slake), ensure_ascii=False))
    link = out / "slake"
    if not link.exists():
        link.symlink_to(slake.resolve(), target_is_directory=True)
    mixes = {arm: mix(CONFIGS / f"mix_arm_{arm}.yaml", out / "mix", base_dir=out) for arm in ARMS}
    for arm, m in mixes.items():
        log(f"mix arm ({arm}): {m['total']} samples")
    return {"curate": cur, "generate": gen, "quality": q, "mix": mixes}


def corpus_lines(samples: list[dict]) -> list[str]:
    """One line per sample, its turns joined, the image token left out: the tiny LM's pretraining text."""
    from medvl.prompts import IMAGE_TOKEN

    return [
        " ".join(t["value"].replace(IMAGE_TOKEN, "").strip() for t in s["conversations"]).replace("\n", " ")
        for s in samples
    ]


def pretrain_parts(out: Path, seed: int, sz: dict, log=print) -> dict:
    """The shared tiny parts: tokenizer + LM on the train questions and the kept generated text, the
    vision tower on the labels of the kept (train-split, test-guarded) images; then the base model."""
    from medvl.model.build import build_from_parts, load_preset
    from medvl.model.tokenizer import train_tokenizer
    from medvl.records import read_rows
    from medvl.train.pretrain import pretrain_llm, pretrain_vision

    spec = load_preset("tiny")
    kept = read_rows(out / "quality" / "kept.jsonl")
    corpus = corpus_lines(read_rows(out / "questions" / "slake_train.json") + kept)
    random.Random(seed).shuffle(corpus)
    tokenizer = train_tokenizer(corpus, spec.tokenizer_vocab_size)
    log(f"pretraining the LM on {len(corpus)} lines")
    llm = pretrain_llm(
        spec, tokenizer, corpus, out / "parts" / "llm", steps=sz["llm_steps"], seed=seed, log=log
    )
    records = vision_records(kept)
    log(f"pretraining the vision tower on {len(records)} train-split images")
    vision = pretrain_vision(
        spec,
        records,
        out / "quality",
        out / "parts" / "vision",
        fields=("modality", "body_region", "label"),
        steps=sz["vision_steps"],
        seed=seed,
        log=log,
    )
    vlm = build_from_parts(
        str(out / "parts" / "vision"),
        str(out / "parts" / "llm"),
        vision_feature_layer=spec.vision_feature_layer,
        vision_feature_select_strategy=spec.vision_feature_select_strategy,
    )
    vlm.save(out / "base")
    return {"llm": llm, "vision": vision, "vision_images": len(records), "lm_lines": len(corpus)}


def train_arms(out: Path, sz: dict, seed: int) -> dict:
    from medvl.train.config import load_config
    from medvl.train.loop import run_stages

    finals = {}
    for arm in ARMS:
        cfg = load_config(CONFIGS / f"arm_{arm}.yaml", base_dir=out, max_steps=sz["arm_steps"], seed=seed)
        finals[arm] = run_stages([cfg], model=out / "base")[0]
    return finals


def evaluate_arms(out: Path, slake: Path, finals: dict, sz: dict, test: bool) -> dict:
    """The English validation split (where settings would be chosen) always; with `test`, also the English
    test split with the image-dependence check and the Chinese test split (the image check is left out
    there to fit the time budget); arm (b) against arm (a) on each."""
    from medvl.eval import evaluate
    from medvl.eval.report import compare

    # SLAKE names its validation file validate.json
    runs = [("validate", "en", False)] + ([("test", "en", True), ("test", "zh", False)] if test else [])
    results: dict = {}
    for split, lang, check in runs:
        key = f"{split}-{lang}"
        folders = {}
        for arm in ARMS:
            folders[arm] = out / "eval" / f"arm_{arm}" / key
            results.setdefault(key, {})[arm] = evaluate(
                str(finals[arm]),
                "slake",
                slake,
                folders[arm],
                split=split,
                lang=lang,
                image_check=check,
                limit=sz["questions"],
                batch_size=EVAL_BATCH,
                max_new_tokens=EVAL_NEW_TOKENS,
                progress=False,
            )
        compare([folders["b"], folders["a"]], out / "compare" / key)
        results[key]["b_vs_a"] = json.loads((out / "compare" / key / "compare.json").read_text())
    return results


def exposures(out: Path, sz: dict, data: dict) -> dict:
    """How many times each train question is seen in each arm: the arm's samples drawn
    (steps x global batch) over its mixture's size, every question being in each mixture once."""
    import yaml

    batch = yaml.safe_load((CONFIGS / "arm_a.yaml").read_text())["global_batch_size"]
    drawn = sz["arm_steps"] * batch
    return {
        arm: {
            "mixture": data["mix"][arm]["total"],
            "samples_drawn": drawn,
            "times_each_train_question_seen": round(drawn / data["mix"][arm]["total"], 3),
        }
        for arm in ARMS
    }


def leakage(out: Path) -> dict:
    """What the quality guard saw and dropped, by the test image's hash."""
    rep = json.loads((out / "quality" / "report.json").read_text())
    return {"benchmark": rep["benchmark"], "counts": rep["counts"]}


def pct(v: float | None, ci: list[float] | None = None) -> str:
    if v is None:
        return "–"
    return f"{100 * v:.1f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def closed_random_guess(report: dict) -> float:
    """Every SLAKE closed question has two possible answers (yes/no, or the two alternatives it names):
    a uniform guess is right half the time. Open questions have no answer list: 0."""
    closed = report["breakdowns"]["answer type"].get("CLOSED", {}).get("n", 0)
    return 0.5 * closed / report["overall"]["n"]


METRICS = (
    ("closed_accuracy", "closed acc."),
    ("open_recall", "open recall"),
    ("open_exact_match", "open exact"),
    ("accuracy", "overall acc."),
)


def split_section(key: str, res: dict) -> list[str]:
    """The tables of one evaluated split: arms, baselines, difference, by content type, image check."""
    a, b, cmp = res["a"], res["b"], next(iter(res["b_vs_a"]["paired"].values()))
    n = a["overall"]["n"]
    closed = a["breakdowns"]["answer type"].get("CLOSED", {}).get("n", 0)
    lines = [f"### {key} ({n} questions, {closed} closed)", ""]
    lines += ["| | " + " | ".join(name for _, name in METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    guess = closed_random_guess(a)
    lines.append(f"| random guess | 50.0 | 0.0 | 0.0 | {100 * guess:.1f} |")
    for base in ("majority", "question_prior"):
        bl = a["overall"].get("baselines", {}).get(base)
        if bl:
            cells = [pct(bl.get(m), bl["ci95"].get(m)) for m, _ in METRICS]
            lines.append(f"| {base.replace('_', ' ')} | " + " | ".join(cells) + " |")
    for arm, rep in (("a", a), ("b", b)):
        cells = [pct(rep["overall"].get(m), rep["overall"]["ci95"].get(m)) for m, _ in METRICS]
        lines.append(f"| **arm ({arm})** | " + " | ".join(cells) + " |")
    ov = cmp["overall"]
    lines += [
        "",
        f"Arm (b) − arm (a), accuracy: **{100 * ov['difference']:+.1f} points**, paired bootstrap 95% "
        f"interval [{100 * ov['ci95'][0]:+.1f}, {100 * ov['ci95'][1]:+.1f}]; McNemar "
        f"({ov['mcnemar']['method']}): "
        f"p = {ov['mcnemar']['p_value']:.3g} ({ov['mcnemar']['a_only']} questions only (b) got right, "
        f"{ov['mcnemar']['b_only']} only (a)).",
        "",
        "| group | n | majority | question prior | arm (a) | arm (b) | (b) − (a) [95% CI] | McNemar p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for breakdown in ("answer type", "content type"):
        for group, ga in a["breakdowns"][breakdown].items():
            gb = b["breakdowns"][breakdown][group]
            c = cmp["breakdowns"][breakdown][group]
            bl = ga.get("baselines", {})
            lines.append(
                f"| {group} | {ga['n']} | {pct(bl.get('majority', {}).get('accuracy'))} "
                f"| {pct(bl.get('question_prior', {}).get('accuracy'))} | {pct(ga['accuracy'])} "
                f"| {pct(gb['accuracy'])} | {100 * c['difference']:+.1f} [{100 * c['ci95'][0]:+.1f}, "
                f"{100 * c['ci95'][1]:+.1f}] | {c['mcnemar']['p_value']:.3g} |"
            )
    dep = {arm: rep.get("image_dependence") for arm, rep in (("a", a), ("b", b))}
    if all(dep.values()):
        lines += [
            "",
            "Image dependence (accuracy with the real images minus with blank / another question's image):",
            "",
            "| arm | blank: drop [95% CI], p | shuffled: drop [95% CI], p "
            "| answers changed (blank / shuffled) | flagged image-independent |",
            "|---|---|---|---|---|",
        ]
        for arm, d in dep.items():
            v = d["variants"]
            cells = [
                f"{100 * v[x]['drop']:+.1f} [{100 * v[x]['drop_ci95'][0]:+.1f}, "
                f"{100 * v[x]['drop_ci95'][1]:+.1f}], {v[x]['mcnemar']['p_value']:.3g}"
                for x in ("blank", "shuffled")
            ]
            flag = "yes" if d["image_independent"] else "no"
            changed = (
                f"{100 * v['blank']['answers_changed']:.0f}% / {100 * v['shuffled']['answers_changed']:.0f}%"
            )
            lines.append(f"| ({arm}) | {cells[0]} | {cells[1]} | {changed} | {flag} |")
    return lines + [""]


def write_report(out: Path, summary: dict, histories: dict, parts: dict) -> None:
    """report.md (the tables), report.json (the summary) and report.png (accuracy bars, loss curves)."""
    from matplotlib.figure import Figure  # a bare Figure: no pyplot, no process-wide backend switch

    results = summary["results"]
    fig = Figure(figsize=(5 * (len(results) + 1), 3.8))
    axes = fig.subplots(1, len(results) + 1)
    for ax, (key, res) in zip(axes, results.items()):
        names = ["closed_accuracy", "open_recall", "accuracy"]
        width = 0.2
        series = [
            ("majority", res["a"]["overall"].get("baselines", {}).get("majority", {})),
            ("question prior", res["a"]["overall"].get("baselines", {}).get("question_prior", {})),
            ("arm (a)", res["a"]["overall"]),
            ("arm (b)", res["b"]["overall"]),
        ]
        for i, (label, m) in enumerate(series):
            ax.bar(
                [j + (i - 1.5) * width for j in range(len(names))],
                [100 * (m.get(x) or 0) for x in names],
                width,
                label=label,
            )
        ax.set_xticks(range(len(names)), ["closed acc.", "open recall", "overall acc."])
        ax.set(title=f"SLAKE {key}", ylabel="%", ylim=(0, 100))
        ax.legend(fontsize=7)
    for arm, hist in histories.items():
        axes[-1].plot([h["step"] for h in hist], [h["loss"] for h in hist], label=f"arm ({arm})")
    axes[-1].set(title="Training loss (assistant tokens)", xlabel="optimizer step", ylabel="loss")
    axes[-1].legend()
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=100)

    ex, q = summary["exposures"], summary["quality"]
    bench = q["benchmark"]
    lines = [
        "# SLAKE experiment: train questions only (a) vs. + annotation-guided data (b)",
        "",
        "*For research use only. Not for diagnosis or treatment decisions.*",
        "",
        f"Command: `{summary['command']}` (seed {summary['seed']}, size {summary['size']}).",
        "",
        "## Budget",
        "",
        f"Both arms: {summary['settings']['arm_steps']} optimizer steps of 32 samples from the same base.",
        "",
        "| arm | mixture size | samples drawn | times each train question is seen | tokens trained |",
        "|---|---|---|---|---|",
    ]
    for arm in ARMS:
        lines.append(
            f"| ({arm}) | {ex[arm]['mixture']} | {ex[arm]['samples_drawn']} | "
            f"{ex[arm]['times_each_train_question_seen']} | {summary['tokens_trained'][arm] or '–'} |"
        )
    lines += [
        "",
        "## Leakage guard",
        "",
        f"Generation read {summary['generated']['records']} train-split records "
        f"({summary['generated']['kept']} samples kept by validation). `medvl quality` with "
        f"`--benchmark {', '.join(bench['given'])}` saw {bench['images_seen']} test images and dropped the "
        f"generated samples of {len(bench['dropped'])} of them (near or exact matches):",
        "",
        "| test image (sha256) | where | samples dropped | from records | match, distance |",
        "|---|---|---|---|---|",
    ]
    for d in bench["dropped"]:
        lines.append(
            f"| `{d['sha256']}` | {Path(d['where']).parent.name} | {d['samples']} | "
            f"{', '.join(Path(r).parent.name for r in d['records'])} | "
            f"{', '.join(d['match'])}, {d['distance']} |"
        )
    lines += ["", "## Results", ""]
    for key, res in results.items():
        lines += split_section(key, res)
    lines += ["## Time per step (s)", ""] + [f"- {k}: {v}" for k, v in summary["timings_s"].items()]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--out", type=Path, default=Path("runs/slake-experiment"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--slake", type=Path, default=DEFAULT_SLAKE, help="The SLAKE folder (train.json, imgs/, ...)."
    )
    ap.add_argument("--test", action="store_true", help="Evaluate the test split too (once, at the end).")
    args = ap.parse_args(argv)
    sz = SIZES[args.size]
    out, slake = args.out, args.slake.resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        timings[name] = round(time.perf_counter() - t, 1)
        print(f"[{name}] {timings[name]:.0f}s", flush=True)
        t = time.perf_counter()

    data = prepare_data(out, slake, sz, args.seed)
    lap("data")
    parts = pretrain_parts(out, args.seed, sz)
    lap("pretrain")
    finals = train_arms(out, sz, args.seed)
    lap("train")
    results = evaluate_arms(out, slake, finals, sz, args.test)
    lap("evaluate")
    histories = {arm: json.loads((out / f"arm_{arm}" / "history.json").read_text()) for arm in ARMS}
    summary = {
        "command": "python benchmarks/slake_experiment.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "size": args.size,
        "seed": args.seed,
        "settings": sz,
        "exposures": exposures(out, sz, data),
        "tokens_trained": {arm: sum(h.get("tokens", 0) for h in histories[arm]) for arm in ARMS},
        "generated": {k: data["generate"][k] for k in ("records", "read", "kept", "rejected")},
        "quality": leakage(out),
        "mix": {arm: data["mix"][arm] for arm in ARMS},
        "pretraining": {k: v for k, v in parts.items() if k not in ("llm", "vision")},
        "results": results,
        "timings_s": timings,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    write_report(out, summary, histories, parts)
    return summary


if __name__ == "__main__":
    main()
