"""Embedded default data: procedural labelled medical images, 3D CT phantoms, template instruction data."""

from medvl.synth.dataset import read_records, write_synthetic
from medvl.synth.images import Plan, SynthImage, generate, render, sample_plan
from medvl.synth.phantom import Phantom, make_phantom, window
from medvl.synth.templates import build_quickstart_data

__all__ = [
    "Phantom",
    "Plan",
    "SynthImage",
    "build_quickstart_data",
    "generate",
    "make_phantom",
    "read_records",
    "render",
    "sample_plan",
    "window",
    "write_synthetic",
]
