"""The `slices` (2.5D) route: a preprocessed volume becomes K slabs, each an RGB image for the model's
existing 2D tower, given to a stock `LlavaForConditionalGeneration` as K images of one sample.

- `volume_slabs(array, k)`: a uint8 [C, S, P, L] array (`VolumeSpec.apply`) -> k axial RGB images,
  inferior first. Slab i covers slices [i * S // k, (i + 1) * S // k) (every slice in exactly one slab).
  Three channels (a spec with three windows, e.g. abdomen, lung, bone): the **windows** are the RGB
  channels, each the slab's mean over its slices, so the tower sees soft tissue, air and bone at once.
  Any other channel count (one MR percentile channel, or two CT windows): **adjacent slices** of the
  first channel are the RGB channels: the slab's first, middle and last third, each averaged, so the
  tower sees the slab's extent along S in colour. Averaging rather than picking one slice per slab keeps
  a structure between two picked slices visible (a thick-slab view).
- `slab_count(slices, tokens_per_image, budget)`: K = as many slabs as the token budget of one volume
  pays for (tokens per image: the model config's `image_seq_length`), at most one per slice.
- Inference input (`medvl chat`, `medvl serve`): `read_scan` takes a NIfTI file (.nii or .nii.gz), a
  DICOM series as a folder or a .zip, as a path or bytes, with the checks of `read_volume` /
  `read_dicom_series` (truncated gzip, NaN, 4D, missing or duplicated slices) and limits on bytes and
  voxels; `scan_slabs` preprocesses it with the default spec (`default_volume_spec`, through the same
  `VolumeSpec.apply` as curation) and cuts the slabs.
"""

from __future__ import annotations

import io
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from medvl.errors import InputError

from .files import check_size
from .volume import read_dicom_series, read_volume
from .volume_spec import VolumeSpec

# Image tokens one volume may take when nothing else is said: 7 slabs of a 336 px CLIP tower (576
# tokens each), 16 of a 224 px one (256), every slice of a 32-slice volume for the `tiny` preset (16).
DEFAULT_VOLUME_TOKENS = 4096

# The specs chat and the server apply to a scan (docs/3d.md). CT (HU): 1.5 mm in-plane over 38 cm, 5 mm
# slices over 16 cm, cropped to the body first; the abdomen, lung and bone windows as the three
# channels, so each slab shows all three. Anything else: 1 mm in-plane, 4 mm slices, one percentile
# channel (slabs of adjacent slices).
DEFAULT_CT_SPEC = VolumeSpec(
    spacing=(5.0, 1.5, 1.5), size=(32, 256, 256), windows=("abdomen", "lung", "bone"), crop_foreground=True
)
DEFAULT_OTHER_SPEC = VolumeSpec(spacing=(4.0, 1.0, 1.0), size=(32, 256, 256), crop_foreground=True)

MAX_SCAN_BYTES = 64 * 1024 * 1024  # a compressed upload
MAX_SCAN_VOXELS = 1 << 26  # 67M voxels, e.g. 512 x 512 x 256: 256 MiB as float32 while it is resampled
MAX_SERIES_FILES = 2048
NIFTI_SUFFIXES = (".nii", ".nii.gz")
HEAD = 1 << 16  # bytes read to recognise a file: a gzipped NIfTI header inflates from far fewer
# A NIfTI file names no modality: it is read as CT when this share of its voxels is air in HU. MR and PET
# magnitudes are not negative; an MR resampled with a sinc kernel (nibabel's SPM-normalised
# anatomical.nii: min -610) rings below 0 at a few voxels only.
AIR_HU, AIR_SHARE = -500.0, 0.01


def slab_mode(channels: int) -> str:
    """How `volume_slabs` fills RGB: "windows" (three channels) or "adjacent slices" (any other count)."""
    return "windows" if channels == 3 else "adjacent slices"


def slab_count(slices: int, tokens_per_image: int, budget: int = DEFAULT_VOLUME_TOKENS) -> int:
    """K slabs for a volume of `slices` slices: as many images as `budget` tokens pay for, at most one
    per slice."""
    if tokens_per_image < 1 or budget < tokens_per_image:
        raise ValueError(
            f"a volume token budget of {budget} does not pay for one image of {tokens_per_image} tokens"
        )
    return max(1, min(slices, budget // tokens_per_image))


def volume_slabs(array: np.ndarray, k: int) -> list[Image.Image]:
    """A uint8 [C, S, P, L] array -> `k` axial RGB slabs, inferior first (module docstring)."""
    if array.ndim != 4 or array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 [C, S, P, L] array, got {array.dtype} {list(array.shape)}")
    channels, slices = array.shape[:2]
    if not 1 <= k <= slices:
        raise ValueError(f"{k} slabs of a volume of {slices} slices: need 1 <= k <= {slices}")
    edges = [i * slices // k for i in range(k + 1)]  # slab i: [edges[i], edges[i + 1]), never empty
    out = []
    for a, b in zip(edges, edges[1:], strict=False):
        if slab_mode(channels) == "windows":
            rgb = array[:, a:b].mean(axis=1)
        else:
            n = b - a  # three consecutive thirds of the slab; a slab of 1-2 slices repeats one
            thirds = [(a + j * n // 3, a + max((j + 1) * n // 3, j * n // 3 + 1)) for j in range(3)]
            rgb = np.stack([array[0, lo:hi].mean(axis=0) for lo, hi in thirds])
        out.append(Image.fromarray(np.rint(rgb).astype(np.uint8).transpose(1, 2, 0), "RGB"))
    return out


# ---------------------------------------------------------------- scans at inference


def is_scan(source: str | Path) -> bool:
    """Whether a path is a scan for `read_scan` (a folder, a .zip, a .nii or .nii.gz file) rather than a
    2D image for `read_image`."""
    path = Path(source)
    return path.is_dir() or path.suffix.lower() == ".zip" or path.name.lower().endswith(NIFTI_SUFFIXES)


def read_scan(
    source: str | Path | bytes,
    name: str | None = None,
    *,
    max_bytes: int = MAX_SCAN_BYTES,
    max_voxels: int = MAX_SCAN_VOXELS,
):
    """A NIfTI volume or a DICOM series (a folder, or a .zip of its files) -> (a scalar 3D SimpleITK
    image, its modality: the series' Modality tag; for NIfTI, which names none, "CT" when at least 1% of
    its voxels lie below -500, air in HU, around and inside every CT body; else ""). Refused with
    InputError: anything else, above `max_bytes` (the file, or the zip's files unpacked) or
    `max_voxels`, and whatever `read_volume` and `read_dicom_series` refuse (truncated gzip, NaN, 4D,
    missing or duplicated slices)."""
    import SimpleITK as sitk

    name = name or ("<bytes>" if isinstance(source, bytes) else str(source))
    path = None if isinstance(source, bytes) else Path(source)
    if path is not None and path.is_dir():
        files = [p for p in path.iterdir() if p.is_file()]
        _check_series_files(len(files), sum(p.stat().st_size for p in files), name, max_bytes)
        return _series(path, name, max_voxels)
    check_size(source, name, max_bytes)
    data = (lambda: source) if path is None else path.read_bytes  # a file read whole only when needed
    if path is None:
        head = source[:HEAD]
    else:
        with open(path, "rb") as f:
            head = f.read(HEAD)
    with tempfile.TemporaryDirectory(prefix="medvl-scan-") as tmp:
        if head[:2] == b"PK":
            _unzip(data(), Path(tmp), name, max_bytes)
            return _series(Path(tmp), name, max_voxels)
        if not _nifti_head(head):
            raise InputError(name, "image", "not a NIfTI volume (.nii, .nii.gz) or a zipped DICOM series")
        if path is None or not path.name.lower().endswith(NIFTI_SUFFIXES):  # SimpleITK goes by the name
            path = Path(tmp) / ("scan.nii.gz" if head[:2] == b"\x1f\x8b" else "scan.nii")
            path.write_bytes(data())
        _check_nifti_shape(path, name, max_voxels)
        img = read_volume(path, name)
    air = float((sitk.GetArrayViewFromImage(img) < AIR_HU).mean())
    return img, "CT" if air >= AIR_SHARE else ""


def default_volume_spec(modality: str) -> VolumeSpec:
    return DEFAULT_CT_SPEC if modality == "CT" else DEFAULT_OTHER_SPEC


def scan_slabs(
    source: str | Path | bytes,
    tokens_per_image: int,
    budget: int = DEFAULT_VOLUME_TOKENS,
    name: str | None = None,
    *,
    max_bytes: int = MAX_SCAN_BYTES,
    max_voxels: int = MAX_SCAN_VOXELS,
) -> list[Image.Image]:
    """A scan (`read_scan`) -> its slabs: the default spec for its modality, then `volume_slabs` with
    K = `slab_count` for the model's tokens per image and the budget."""
    name = name or ("<bytes>" if isinstance(source, bytes) else str(source))
    img, modality = read_scan(source, name, max_bytes=max_bytes, max_voxels=max_voxels)
    array = default_volume_spec(modality).apply(img, name=name).array
    return volume_slabs(array, slab_count(array.shape[1], tokens_per_image, budget))


def _nifti_head(head: bytes) -> bool:
    """The first `HEAD` bytes of a file: NIfTI-1 ("n+1"/"ni1" at byte 344) or NIfTI-2 ("n+2"/"ni2" at
    byte 4), gzipped or not."""
    if head[:2] == b"\x1f\x8b":
        try:
            head = zlib.decompressobj(wbits=31).decompress(head, 600)
        except zlib.error:  # a stream broken within its header: not recognisably NIfTI
            return False
    return head[344:347] in (b"n+1", b"ni1") or head[4:7] in (b"n+2", b"ni2")


def _check_nifti_shape(path: Path, name: str, max_voxels: int) -> None:
    """Refuse 4D and oversized volumes from the header, before any voxel is read."""
    import nibabel as nib

    try:
        shape = nib.load(str(path)).shape
    except Exception as e:  # nibabel's many header errors; the type names no value of the file
        raise InputError(name, "image", f"unreadable NIfTI header ({type(e).__name__})") from None
    dims = [int(n) for n in shape]
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    if len(dims) != 3:
        raise InputError(name, "image", f"expected a scalar 3D volume, got {len(dims)}D {dims}")
    if int(np.prod(dims)) > max_voxels:
        raise InputError(name, "image", f"volume of {dims} voxels, above the {max_voxels}-voxel limit")


def _check_series_files(n: int, size: int, name: str, max_bytes: int) -> None:
    if n > MAX_SERIES_FILES:
        raise InputError(name, "series", f"{n} files, above the limit of {MAX_SERIES_FILES}")
    if size > max_bytes:
        raise InputError(name, "series", f"{size} bytes of files, above the {max_bytes}-byte limit")


def _unzip(data: bytes, folder: Path, name: str, max_bytes: int) -> None:
    """A zip's files (folders and names ignored, so no name can point outside `folder`) as
    folder/00000.dcm ..., refused above `max_bytes` unpacked (a zip bomb) before anything is inflated."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            members = [m for m in z.infolist() if not m.is_dir()]
            _check_series_files(len(members), sum(m.file_size for m in members), name, max_bytes)
            for i, m in enumerate(members):
                with z.open(m) as src:
                    payload = src.read(m.file_size + 1)
                if len(payload) > m.file_size:  # the stored size lied: a bomb past the check above
                    raise InputError(name, "series", "a zip member is larger than its header says")
                (folder / f"{i:05d}.dcm").write_bytes(payload)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError, zlib.error) as e:
        raise InputError(name, "series", f"not a readable zip ({type(e).__name__})") from None


def _series(folder: Path, name: str, max_voxels: int):
    img, header = read_dicom_series(folder, name, "*")
    voxels = int(np.prod(img.GetSize()))
    if voxels > max_voxels:
        raise InputError(name, "series", f"{voxels} voxels, above the {max_voxels}-voxel limit")
    return img, str(header.get("Modality", "") or "")
