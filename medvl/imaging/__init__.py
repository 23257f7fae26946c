"""The only code that turns a file into pixels, so training, curation and serving see identical pixels.

- `read_image(source, preprocessing, size=...)`: a path or bytes (PNG, JPEG, any format PIL reads, or
  DICOM) -> an RGB PIL image, with limits on bytes and pixels: the entry point of serving, the web UI,
  `medvl chat`, evaluation and training's image reads.
- `Preprocessing`: the description that fully determines DICOM/volume/16-bit file -> uint8 pixels (CT
  window policy, percentile normalisation, max side). Curated records and checkpoints carry one.
- Curation's building blocks: `open_image` (2D files), `read_dicom` (-> `DicomFile.render`),
  `read_volume` / `read_dicom_series` (+ `to_lps`, `volume_planes`, `make_display`), `to_display`,
  `resize_spacing`.
- The `slices` (2.5D) route: `volume_slabs` (a preprocessed volume -> K RGB slabs), `slab_count` (K from
  a token budget), `read_scan` / `scan_slabs` (a NIfTI file or DICOM series at inference -> slabs).
- `VolumeSpec`: the description that fully determines scan -> uint8 [C, S, P, L] volume (orientation,
  spacing, windows, foreground crop, size); `apply` is what curation stores and serving computes.
- Identity keys: `content_hash` (exact, over decoded pixels), `perceptual_hash` (64-bit pHash).
- CT windows: `CT_WINDOWS` (the one table), `WINDOW_BY_REGION`, `window`, `ct_window`.

SimpleITK and pydicom are imported where a volume or DICOM file is read, so reading a PNG loads neither.
"""

from .dicom import DicomFile, read_dicom
from .display import (
    Display,
    make_display,
    normalise_percentile,
    reduce_for_size,
    reference_planes,
    resize_spacing,
    to_display,
)
from .files import MAX_BYTES, MAX_PIXELS, is_dicom, read_bytes, store_volume
from .hashing import content_hash, perceptual_hash
from .preprocessing import DEFAULT_PREPROCESSING, Preprocessing
from .read import open_image, read_image
from .slabs import (
    DEFAULT_CT_SPEC,
    DEFAULT_OTHER_SPEC,
    DEFAULT_VOLUME_TOKENS,
    default_volume_spec,
    is_scan,
    read_scan,
    scan_slabs,
    slab_count,
    slab_mode,
    volume_slabs,
)
from .volume import (
    AXES,
    check_same_grid,
    orientation_code,
    read_dicom_series,
    read_volume,
    to_lps,
    volume_planes,
)
from .volume_spec import PreparedVolume, VolumeSpec, label_boxes
from .windows import (
    CT_WINDOWS,
    DICOM_BODY_PARTS,
    FALLBACK_WINDOW,
    WINDOW_BY_REGION,
    body_part_region,
    ct_window,
    window,
)

__all__ = [
    "AXES",
    "CT_WINDOWS",
    "DEFAULT_CT_SPEC",
    "DEFAULT_OTHER_SPEC",
    "DEFAULT_PREPROCESSING",
    "DEFAULT_VOLUME_TOKENS",
    "DICOM_BODY_PARTS",
    "FALLBACK_WINDOW",
    "MAX_BYTES",
    "MAX_PIXELS",
    "WINDOW_BY_REGION",
    "DicomFile",
    "Display",
    "Preprocessing",
    "PreparedVolume",
    "VolumeSpec",
    "body_part_region",
    "check_same_grid",
    "content_hash",
    "ct_window",
    "default_volume_spec",
    "is_dicom",
    "is_scan",
    "label_boxes",
    "make_display",
    "normalise_percentile",
    "open_image",
    "orientation_code",
    "perceptual_hash",
    "read_bytes",
    "store_volume",
    "read_dicom",
    "read_dicom_series",
    "read_image",
    "read_scan",
    "read_volume",
    "reduce_for_size",
    "reference_planes",
    "resize_spacing",
    "scan_slabs",
    "slab_count",
    "slab_mode",
    "to_display",
    "to_lps",
    "volume_planes",
    "volume_slabs",
    "window",
]
