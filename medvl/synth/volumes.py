"""A synthetic 3D source for tests and benchmarks: phantoms written as NIfTI image + label volumes, laid
out as a user's data would be (`<region>/<case>.nii.gz`, `<region>/<case>_seg.nii.gz`), so that
curation reads them through its NIfTI adapter (configs/cards/synthetic-3d.yaml) like any real source.
Case `i` of seed `s` is `case_phantom(region, lesion, (s, i))`: the synthetic 3D benchmark's rule, from
other seeds (medvl.synth.benchmark3d uses 1000), so the lesions a model trains on cover every third,
side and size grade the benchmark asks about."""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from medvl.synth.phantom import case_phantom


def write_phantoms(
    folder: Path, n: int, shape: tuple[int, int, int] = (32, 128, 128), seed: int = 0
) -> list[Path]:
    paths = []
    for i in range(n):
        region = ("chest", "abdomen", "head")[i % 3]
        p = case_phantom(region, i % 2 == 0, (seed, i), shape)
        out = Path(folder) / region
        out.mkdir(parents=True, exist_ok=True)
        for arr, name in ((p.hu, f"case{i:04d}.nii.gz"), (p.labels, f"case{i:04d}_seg.nii.gz")):
            img = sitk.GetImageFromArray(arr)  # [z, y, x]; identity direction = LPS, as the phantom is drawn
            img.SetSpacing(tuple(float(s) for s in p.spacing[::-1]))
            sitk.WriteImage(img, str(out / name))
        paths.append(out / f"case{i:04d}.nii.gz")
    return paths
