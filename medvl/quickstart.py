"""`medvl quickstart`: the whole pipeline on embedded synthetic data, on a CPU, in minutes.

It runs the commands a user runs on real data, in order: `synth` (labelled images with a train/test
split and a dataset card) -> `curate` -> `generate` (template backend, six formats, from the train
split; the benchmark: its multiple-choice items from the test split) -> `quality` (five dimensions; the
benchmark's images are kept out of training) -> `mix` (one mixture per stage) -> pretrain the tiny parts
-> assemble -> stages I, II, III -> evaluate stage I and stage III on the held-out benchmark (five
OmniMedVQA question types) -> report (Markdown, JSON, loss plot) -> how to chat with the result.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from medvl import RESEARCH_ONLY

# Shipped as package data, so `medvl quickstart` runs from any folder after a plain `pip install`.
CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "quickstart"
MIXES = ("stage1", "stage2", "stage3")

# Sizes for the default run (about 14 minutes on 2 idle CPU cores); `--small` is the test configuration.
SIZES = {
    "default": dict(n_train=2400, n_bench=240, llm_steps=200, vision_steps=900, stage_steps=(60, 60, 240)),
    "small": dict(n_train=64, n_bench=24, llm_steps=20, vision_steps=20, stage_steps=(2, 2, 4)),
}
# English only. Measured at the default size (2400 images, 240 stage III steps; 300 vision steps and the
# synthetic set's own-wording benchmark): with the generator's
# default 30% Chinese the 5M-parameter model reached 41.7% modality recognition against 68.7% English
# only (same settings otherwise) -- half as many steps per language for a model that learns each
# language's answers separately. Chinese generation is the same code with --zh-share (tests/test_generate.py).
ZH_SHARE = 0.0
# Worker processes of the data jobs (curate, generate, quality): the 2 cores the quickstart is sized for.
WORKERS = 2


def prepare_data(out: Path, size: str = "default", seed: int = 0, log=print) -> dict:
    """Steps 1-5: synthetic images -> curated records -> generated samples -> quality -> stage mixtures.
    Returns the paths the training steps read."""
    from medvl.curate.card import load_card
    from medvl.curate.pipeline import curate
    from medvl.data.mix import mix
    from medvl.generate.benchmark import write_benchmark
    from medvl.generate.pipeline import generate
    from medvl.generate.template import TemplateBackend
    from medvl.quality.config import load_thresholds
    from medvl.quality.pipeline import quality
    from medvl.records import read_rows
    from medvl.synth.benchmark import write_quickstart_dataset

    sz = SIZES[size]
    out = Path(out)
    log("1/9 synth: labelled images (train and held-out test) and their dataset card")
    paths = write_quickstart_dataset(out / "data", sz["n_train"], sz["n_bench"], seed=seed, benchmark=False)
    log("2/9 curate: the synthetic set by its card, like any source")
    cur = curate([load_card(paths["card"])], out / "curated", workers=WORKERS)
    log(f"  {cur['counts']['kept']} records")
    log("3/9 generate: six formats from the training split (template backend)")
    gen = generate(
        [out / "curated"], out / "generated", TemplateBackend(), seed=seed, workers=WORKERS, zh_share=ZH_SHARE
    )
    log(f"  {gen['kept']} samples kept, {gen['rejected']} rejected by validation")
    log("  the benchmark: the engine's multiple-choice items from the held-out test split")
    bench = out / "bench"
    generate(
        [out / "curated"],
        bench,
        TemplateBackend(),
        splits=("test",),
        formats=("perception",),
        zh_share=0.0,
        seed=seed,
        workers=WORKERS,
    )
    paths["bench_tsv"] = write_benchmark(read_rows(bench / "samples.jsonl"), bench, bench / "mc.tsv")
    log("4/9 quality: five dimensions; the benchmark's images never reach training")
    q = quality(
        [out / "generated"],
        out / "quality",
        load_thresholds(CONFIG_DIR / "quality.yaml"),
        benchmarks=[paths["bench_tsv"]],
        workers=WORKERS,
    )
    log(f"  {q['counts']['kept']} kept, {q['counts']['rejected']} rejected")
    log("5/9 mix: one mixture per stage")
    for name in MIXES:
        m = mix(CONFIG_DIR / f"mix_{name}.yaml", out / "mix", base_dir=out)
        log(f"  {name}: {m['total']} samples")
    return {**paths, **{name: out / "mix" / f"mix_{name}.json" for name in MIXES}}


def corpus_lines(samples: list[dict]) -> list[str]:
    """The tiny LM's pretraining text, standing in for what a pretrained LLM brings to stage I: one line
    per sample of every format (its turns joined, the image token left out) and, for each multiple-choice
    sample, a second line that puts its record's caption (same language) before the question, so that the
    LM learns to answer from a description of the image; stages I-III then only have to make the image
    read like one."""
    from medvl.prompts import IMAGE_TOKEN

    def line(s: dict) -> str:
        return " ".join(t["value"].replace(IMAGE_TOKEN, "").strip() for t in s["conversations"]).replace(
            "\n", " "
        )

    def key(s: dict) -> tuple[str, str]:
        return (s.get("provenance") or {}).get("record_id", ""), str(s.get("lang"))

    captions: dict[tuple[str, str], str] = {}
    for s in samples:
        if s.get("format") == "caption":
            captions.setdefault(key(s), s["conversations"][-1]["value"])
    lines = []
    for s in samples:
        lines.append(line(s))
        caption = captions.get(key(s)) if s.get("format") == "perception" else None
        if caption:
            shows = "图像显示：" if s.get("lang") == "zh" else "The image shows:"
            lines.append(f"{shows} {caption} {line(s)}")
    return lines


class Laps:
    """Wall time per pipeline step, logged as each ends."""

    def __init__(self, log) -> None:
        self.log, self.timings, self.t = log, {}, time.perf_counter()

    def __call__(self, name: str) -> None:
        self.timings[name] = round(time.perf_counter() - self.t, 1)
        self.log(f"[{name}] done in {self.timings[name]:.0f}s")
        self.t = time.perf_counter()


def pretrain_language_model(spec, stage3: Path, out: Path, steps: int, seed: int, log) -> list[float]:
    """A tokenizer trained on, and the preset's tiny LM pretrained on, the stage III text (`corpus_lines`)."""
    from medvl.model.tokenizer import train_tokenizer
    from medvl.records import read_rows
    from medvl.train.pretrain import pretrain_llm

    corpus = corpus_lines(read_rows(stage3))
    tokenizer = train_tokenizer(corpus, spec.tokenizer_vocab_size)
    return pretrain_llm(spec, tokenizer, corpus, out / "parts" / "llm", steps=steps, seed=seed, log=log)


def assemble(spec, vision: Path, out: Path) -> None:
    """`out/base`: the model built from the pretrained parts (the path real weights take)."""
    from medvl.model.build import build_from_parts

    vlm = build_from_parts(
        str(vision),
        str(out / "parts" / "llm"),
        vision_feature_layer=spec.vision_feature_layer,
        vision_feature_select_strategy=spec.vision_feature_select_strategy,
    )
    vlm.save(out / "base")


def train_and_evaluate(
    config_dir: Path,
    stage_steps: tuple[int, ...],
    out: Path,
    bench: str,
    data: Path,
    laps: Laps,
    volume_tokens: int | None = None,
) -> tuple[dict, dict]:
    """Stages I-III from `out/base` by the folder's stage configs, then stage I's and stage III's models
    on the benchmark: (results by "after stage I" / "after stage III", loss histories by stage)."""
    from medvl.eval import evaluate
    from medvl.train.config import load_config
    from medvl.train.loop import run_stages

    cfgs = [
        load_config(config_dir / f"stage{i}.yaml", base_dir=out, max_steps=steps, volume_tokens=volume_tokens)
        for i, steps in enumerate(stage_steps, 1)
    ]
    finals = run_stages(cfgs, model=out / "base")
    histories = {cfg.stage: json.loads((cfg.output_dir / "history.json").read_text()) for cfg in cfgs}
    laps("stages I-III")
    results = {}
    for name, folder in (("after stage I", finals[0]), ("after stage III", finals[2])):
        results[name] = evaluate(str(folder), bench, data, out / "eval" / name.split()[-1])
    laps("evaluate")
    return results, histories


def run_quickstart(out: Path, size: str = "default", seed: int = 0, log=print) -> dict:
    from medvl.model.build import load_preset
    from medvl.records import read_rows
    from medvl.train.pretrain import pretrain_vision

    sz = SIZES[size]
    out = Path(out)
    laps = Laps(log)
    paths = prepare_data(out, size, seed, log)
    laps("data")

    log("6/9 training the tokenizer and pretraining the tiny language model on the stage III text")
    spec = load_preset("tiny")
    llm_losses = pretrain_language_model(spec, paths["stage3"], out, sz["llm_steps"], seed, log)
    laps("pretrain_llm")

    log("7/9 pretraining the tiny vision tower on the image labels (training images only)")
    records = read_rows(Path(paths["records"]))
    vision_losses = pretrain_vision(
        spec, records, out / "data", out / "parts" / "vision", steps=sz["vision_steps"], seed=seed, log=log
    )
    laps("pretrain_vision")

    log("8/9 assembling the model from the pretrained parts (the path real weights take)")
    assemble(spec, out / "parts" / "vision", out)
    laps("assemble")

    log("9/9 training stages I, II, III, then evaluating stage I and stage III on the benchmark")
    results, histories = train_and_evaluate(
        CONFIG_DIR, sz["stage_steps"], out, "mc", Path(paths["bench_tsv"]), laps
    )
    pretrain = {"llm": llm_losses, "vision": vision_losses}
    return make_report(out, results, histories, pretrain, laps.timings, checks_2d(results), INTRO_2D)


# ------------------------------------------------------------------------------------- 3D (--3d)

CONFIG_3D = Path(__file__).resolve().parent / "configs" / "quickstart3d"
# Sizes for `--3d`: synthetic CT phantoms in, the native route (tiny-3d) trained, the synthetic 3D
# benchmark out. The default run is sized for <= 15 minutes on 2 idle CPU cores (docs/3d.md). Phantoms
# are cheap (960 curate and generate in about 70 s) and the stages' cost is per step, not per volume:
# 960 rather than 240 training volumes took organ identification from 68% to 85% at the same steps
# (stage III then sees each sample less than once instead of 2.5 times, loss 0.1: memorised).
SIZES_3D = {
    "default": dict(n_train=960, n_bench=60, llm_steps=200, tower_steps=800, stage_steps=(60, 60, 300)),
    "small": dict(n_train=24, n_bench=6, llm_steps=10, tower_steps=10, stage_steps=(2, 2, 4)),
}


def prepare_data_3d(out: Path, size: str = "default", seed: int = 0, log=print) -> dict:
    """Phantoms -> curated volumes -> generated 3D instructions -> stage mixtures; and the held-out
    synthetic 3D benchmark (other phantoms, drawn from another seed)."""
    from medvl.curate.card import load_card
    from medvl.curate.pipeline import curate
    from medvl.data.mix import mix
    from medvl.generate.pipeline import generate
    from medvl.generate.template import TemplateBackend
    from medvl.synth.benchmark3d import BENCH_SEED, build_synth3d, check_training_seed
    from medvl.synth.volumes import write_phantoms

    check_training_seed(seed)
    sz = SIZES_3D[size]
    out = Path(out)
    phantoms = out / "data" / "phantoms"
    log("1/8 synth: labelled CT phantoms (NIfTI image and label volumes) and their dataset card")
    write_phantoms(phantoms, sz["n_train"], seed=seed)
    card = phantoms / "card.yaml"
    card.write_text((CONFIG_3D / "card.yaml").read_text())
    log("2/8 curate: each phantom kept whole (LPS, resampled, three windows), its labels measured")
    cur = curate([load_card(card)], out / "curated", workers=WORKERS)
    log(f"  {cur['counts']['kept']} volumes")
    log("3/8 generate: 3D instructions in six formats from the volumes' facts (template backend)")
    gen = generate(
        [out / "curated"], out / "generated", TemplateBackend(), seed=seed, workers=WORKERS, zh_share=0.0
    )
    log(f"  {gen['kept']} samples kept, {gen['rejected']} rejected by validation")
    for name in MIXES:
        m = mix(CONFIG_3D / f"mix_{name}.yaml", out / "mix", base_dir=out)
        log(f"  {name}: {m['total']} samples")
    log(f"  the benchmark: the synthetic 3D multiple-choice set on held-out phantoms (seed {BENCH_SEED})")
    bench = build_synth3d(out / "bench", n=sz["n_bench"])
    return {"bench_tsv": bench, **{name: out / "mix" / f"mix_{name}.json" for name in MIXES}}


def checks_3d(results: dict) -> dict[str, bool]:
    final, first = results["after stage III"], results["after stage I"]
    groups = final["breakdowns"]["category"]
    return {
        "overall accuracy >= 2x random guess": final["overall"]["accuracy"]
        >= 2 * final["overall"]["random_guess"],
        "organ identification >= 90%": groups.get("organ", {}).get("accuracy", 0) >= 0.9,
        "stage III beats stage I": final["overall"]["accuracy"] > first["overall"]["accuracy"],
    }


INTRO_3D = [
    "# medvl quickstart --3d report",
    "",
    f"> {RESEARCH_ONLY} These numbers measure a 6M-parameter model on *synthetic* CT phantoms with",
    "> template questions; they show that the 3D pipeline works, not that a model is clinically useful.",
    "",
    "The synthetic 3D benchmark (`medvl eval --bench synth3d`, docs/3d.md) on phantoms drawn from another",
    "seed than the training ones: each gold answer computed from the label volume on the stored grid. Its",
    "question wording is the training data's, so it measures whether the model reads the volumes, not",
    "whether it carries over to new phrasings. Random guess = expected accuracy of picking an option",
    "at random.",
]
ROUTE_WORDS = {
    "native": "tiny-3d: a ViViT tower sees the volume's 8 slabs at once, 64 image tokens",
    "slices": "tiny: the CLIP tower sees the volume's 8 slabs one by one, 8 x 16 = 128 image tokens",
}


# The two 3D routes (docs/3d.md): preset, and the image tokens per volume the stages give the slices
# route (8 slabs of the `tiny` tower's 16 tokens: the 8 slabs the native tower sees, one by one).
ROUTES_3D = {"native": ("tiny-3d", None), "slices": ("tiny", 128)}
SLABS = 8


def run_quickstart_3d(
    out: Path, size: str = "default", seed: int = 0, log=print, route: str = "native"
) -> dict:
    from medvl.model.build import load_preset
    from medvl.train.pretrain import pretrain_volume_text, volume_text_pairs

    sz = SIZES_3D[size]
    out = Path(out)
    laps = Laps(log)
    paths = prepare_data_3d(out, size, seed, log)
    laps("data")

    log("4/8 training the tokenizer and pretraining the tiny language model on the stage III text")
    preset, volume_tokens = ROUTES_3D[route]
    spec = load_preset(preset)
    llm_losses = pretrain_language_model(spec, paths["stage3"], out, sz["llm_steps"], seed, log)
    laps("pretrain_llm")

    log(f"5/8 pretraining the {route} route's tower CLIP-style on the curated volumes and their captions")
    pairs = volume_text_pairs(out / "curated")
    tower = out / "parts" / "tower3d"
    tower_losses = pretrain_volume_text(
        spec, pairs, out / "curated", tower, steps=sz["tower_steps"], seed=seed, slabs=SLABS, log=log
    )
    laps("pretrain_tower")

    log("6/8 assembling the model from the pretrained parts")
    assemble(spec, tower, out)
    laps("assemble")

    log("7/8 training stages I, II, III, then 8/8 evaluating stage I and stage III on the 3D benchmark")
    results, histories = train_and_evaluate(
        CONFIG_3D, sz["stage_steps"], out, "synth3d", Path(paths["bench_tsv"]), laps, volume_tokens
    )
    pretrain = {"llm": llm_losses, f"{route} tower": tower_losses}
    intro = [*INTRO_3D, "", f"Route: **{route}** ({ROUTE_WORDS[route]})."]
    return make_report(
        out, results, histories, pretrain, laps.timings, checks_3d(results), intro, group="kind"
    )


def make_report(
    out: Path,
    results: dict,
    histories: dict,
    pretrain: dict,
    timings: dict,
    checks: dict,
    intro: list[str],
    group: str = "question type",
) -> dict:
    """report.md (results table by `group`, checks, loss curves, timings), report.json, loss_curves.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, losses in pretrain.items():
        axes[0].plot(range(1, len(losses) + 1), losses, label=f"{name} pretraining")
    axes[0].set(title="Pretraining the tiny parts", xlabel="step", ylabel="loss")
    offset = 0
    for stage, hist in histories.items():
        steps = [offset + h["step"] for h in hist]
        axes[1].plot(steps, [h["loss"] for h in hist], label=stage)
        offset = steps[-1] if steps else offset
    axes[1].set(title="Stages I-III (assistant-token loss)", xlabel="step (cumulative)", ylabel="loss")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)

    final, first = results["after stage III"], results["after stage I"]
    groups_final, groups_first = final["breakdowns"]["category"], first["breakdowns"]["category"]
    lines = [
        *intro,
        "",
        f"| {group} | n | random guess | after stage I | after stage III | unresolved (III) |",
        "|---|---|---|---|---|---|",
    ]
    rows = [(c, groups_final[c], groups_first.get(c, {})) for c in groups_final]
    rows.append(("**overall**", final["overall"], first["overall"]))
    for name, f, s in rows:
        lines.append(
            f"| {name} | {f['n']} | {f['random_guess']:.1%} | {s.get('accuracy', float('nan')):.1%} "
            f"| {f['accuracy']:.1%} | {f.get('unresolved', 0)} |"
        )
    lines += ["", "## Checks", ""]
    lines += [f"- [{'x' if ok else ' '}] {name}" for name, ok in checks.items()]
    lines += ["", "## Loss curves", "", "![loss curves](loss_curves.png)", ""]
    lines += ["## Time per pipeline step (s)", ""]
    lines += [f"- {k}: {v}" for k, v in timings.items()]
    lines += ["", f"Total: {sum(timings.values()):.0f}s", ""]
    (out / "report.md").write_text("\n".join(lines))
    report = {
        "results": results,
        "checks": checks,
        "timings_s": timings,
        "model": str(out / "stage3" / "final"),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def checks_2d(results: dict) -> dict[str, bool]:
    final, first = results["after stage III"], results["after stage I"]
    groups = final["breakdowns"]["category"]
    return {
        "overall accuracy >= 2x random guess": final["overall"]["accuracy"]
        >= 2 * final["overall"]["random_guess"],
        "modality recognition >= 90%": groups.get("Modality Recognition", {}).get("accuracy", 0) >= 0.9,
        "stage III beats stage I": final["overall"]["accuracy"] > first["overall"]["accuracy"],
    }


INTRO_2D = [
    "# medvl quickstart report",
    "",
    f"> {RESEARCH_ONLY} These numbers measure a 5M-parameter model on *synthetic* images with",
    "> template questions; they show that the pipeline works, not that a model is clinically useful.",
    "",
    "Held-out synthetic multiple-choice benchmark, grouped by the five OmniMedVQA question types: the",
    "data engine's multiple-choice items written from the test split's labels. Its images never reach",
    "training (quality's contamination guard); its wording and distractor rules are the training data's,",
    "so it measures whether the model reads the images, not whether it carries over to new phrasings.",
    "Random guess = expected accuracy of picking one of the question's options uniformly at random.",
]


def quickstart(
    out: Path = typer.Option(Path("runs/quickstart"), help="Folder for data, parts, checkpoints and report."),
    size: str = typer.Option(
        "default", help="'default' (about 14 min on 2 CPU cores) or 'small' (a smoke run)."
    ),
    seed: int = typer.Option(0),
    three_d: bool = typer.Option(
        False,
        "--3d",
        help="The 3D pipeline instead: CT phantoms -> curated volumes -> 3D instructions -> 3D tower "
        "pretraining -> stages I-III (native route) -> the synthetic 3D benchmark (about 15 min).",
    ),
    route: str = typer.Option(
        "native", help="With --3d: 'native' (a 3D ViViT tower) or 'slices' (the 2D tower over 8 slabs)."
    ),
) -> None:
    """Run the whole pipeline on embedded synthetic data: synthesize, pretrain, stages I-III, evaluate."""
    if size not in SIZES:
        raise typer.BadParameter(f"size must be one of {', '.join(SIZES)}")
    if three_d and out == Path("runs/quickstart"):
        out = Path("runs/quickstart-3d")
    if route not in ROUTES_3D:
        raise typer.BadParameter(f"route must be one of {', '.join(ROUTES_3D)}")
    if three_d:  # prepare_data_3d checks it too; here as a usage error before anything runs
        from medvl.synth.benchmark3d import check_training_seed

        try:
            check_training_seed(seed)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
    report = run_quickstart_3d(out, size, seed, route=route) if three_d else run_quickstart(out, size, seed)
    typer.echo((out / "report.md").read_text())
    typer.echo(f"Report: {out / 'report.md'}  (JSON: {out / 'report.json'}, plot: {out / 'loss_curves.png'})")
    model = report["model"]
    typer.echo("Chat with the result:")
    if three_d:
        typer.echo(
            f"  medvl chat --model {model} --image {out / 'data' / 'phantoms'}/abdomen/case0001.nii.gz"
        )
    else:
        typer.echo(f"  medvl chat --model {model} --image {out / 'data' / 'images'}/<file>.png")
    failed = [name for name, ok in report["checks"].items() if not ok]
    if failed:  # a quickstart that misses its own checks must not look like a success (CI runs it)
        typer.echo(f"medvl quickstart: {len(failed)} check(s) failed: {'; '.join(failed)}", err=True)
        raise typer.Exit(code=1)
