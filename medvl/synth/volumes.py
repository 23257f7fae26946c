"""A synthetic 3D source for tests and benchmarks: phantoms written as NIfTI image + label volumes, laid
out as a user's data would be (`<region>/<case>.nii.gz`, `<region>/<case>_seg.nii.gz`), so that
curation reads them through its NIfTI adapter (configs/cards/synthetic-3d.yaml) like any real source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medvl.synth.phantom import make_phantom


def write_phantoms(
    folder: Path, n: int, shape: tuple[int, int, int] = (32, 128, 128), seed: int = 0
) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        region = ("chest", "abdomen", "head")[i % 3]
        p = make_phantom(region, shape, rng, lesion=bool(i % 2 == 0))
        out = Path(folder) / region
        out.mkdir(parents=True, exist_ok=True)
        for arr, name in ((p.hu, f"case{i:04d}.nii.gz"), (p.labels, f"case{i:04d}_seg.nii.gz")):
            img = sitk.GetImageFromArray(arr)  # [z, y, x]; identity direction = LPS, as the phantom is drawn
            img.SetSpacing(tuple(float(s) for s in p.spacing[::-1]))
            sitk.WriteImage(img, str(out / name))
        paths.append(out / f"case{i:04d}.nii.gz")
    return paths
