from __future__ import annotations

import time
from pathlib import Path

import typer


def synth(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (created if missing)."),
    n_train: int = typer.Option(2000, help="Number of training images."),
    n_bench: int = typer.Option(300, help="Number of held-out benchmark images (a separate seed stream)."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives byte-identical files."),
    size: int = typer.Option(128, help="Image side in pixels."),
) -> None:
    """Write the embedded synthetic data set: labelled images, their records, the dataset card
    (synthetic.yaml, for `medvl curate`) and the held-out multiple-choice benchmark (a VLMEvalKit TSV);
    no download. Instruction data comes from `medvl curate` + `medvl generate`, as for real data.

    Six modalities (X-ray, CT from 3D HU phantoms, MR, fundus, dermoscopy, histopathology) with labels for
    modality, region, anatomy, department, finding, bbox, grade and location.
    """
    from medvl.synth.benchmark import write_quickstart_dataset

    t0 = time.perf_counter()
    paths = write_quickstart_dataset(out, n_train, n_bench, seed, size)
    counts = {
        "train images": sum(1 for _ in paths["records"].open()),
        "bench images": sum(1 for _ in paths["bench_records"].open()),
        "bench questions": sum(1 for _ in paths["bench_tsv"].open()) - 1,
    }
    typer.echo(f"medvl synth: wrote {out} in {time.perf_counter() - t0:.1f}s")
    for k, v in counts.items():
        typer.echo(f"  {k:<18} {v}")
    for k, p in paths.items():
        typer.echo(f"  {k:<18} {p}")
    typer.echo(f"Next: medvl curate --card {paths['card']} --out <curated>")
