"""Embedded default data: procedural labelled medical images with a dataset card, 3D CT phantoms,
the synthetic multiple-choice benchmark."""

from medvl.imaging import window
from medvl.synth.benchmark import write_quickstart_dataset
from medvl.synth.dataset import write_synthetic
from medvl.synth.images import Plan, SynthImage, render, sample_plan, synthesize
from medvl.synth.phantom import Phantom, make_phantom

__all__ = [
    "Phantom",
    "Plan",
    "SynthImage",
    "synthesize",
    "make_phantom",
    "render",
    "sample_plan",
    "window",
    "write_quickstart_dataset",
    "write_synthetic",
]
