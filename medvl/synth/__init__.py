"""Embedded default data: procedural labelled medical images, 3D CT phantoms, template instruction data."""

from medvl.imaging import window
from medvl.synth.dataset import write_synthetic
from medvl.synth.images import Plan, SynthImage, render, sample_plan, synthesize
from medvl.synth.phantom import Phantom, make_phantom
from medvl.synth.templates import build_quickstart_data

__all__ = [
    "Phantom",
    "Plan",
    "SynthImage",
    "build_quickstart_data",
    "synthesize",
    "make_phantom",
    "render",
    "sample_plan",
    "window",
    "write_synthetic",
]
