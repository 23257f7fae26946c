"""CT display windows, the one table of them, and how a body region picks one.

A CT value is physical (Hounsfield units), so a window (centre, width) maps it onto 0-255 the same way
for every scanner; the window is chosen by what is being looked at. The synthetic CT generator, the
curation stage and the model's inference path all read this table.
"""

from __future__ import annotations

import numpy as np

from medvl.vocab import BODY_REGIONS

# Named display windows, (centre, width) in HU: the standard radiology presets. Checkpoints and curated
# records that say "auto" or a name are rendered through these values, so changing one changes the
# pixels those models are served with: add a new name instead.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "abdomen": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}

# The window a body region (medvl.vocab.BODY_REGIONS) is shown with when the policy is "auto".
WINDOW_BY_REGION: dict[str, str] = {
    "Head": "brain",
    "Neck": "mediastinum",
    "Chest": "lung",
    "Breast": "mediastinum",
    "Abdomen": "abdomen",
    "Pelvis": "abdomen",
    "Spine": "bone",
    "Upper limb": "bone",
    "Lower limb": "bone",
}
# Regions without an entry, and files that name no region: soft tissue, the window most CT is read in.
FALLBACK_WINDOW = "abdomen"

# DICOM BodyPartExamined defined terms (PS3.16 CID 4031) that are not spelled like a BODY_REGIONS entry.
DICOM_BODY_PARTS: dict[str, str] = {
    "BRAIN": "Head",
    "SKULL": "Head",
    "THORAX": "Chest",
    "LUNG": "Chest",
    "CSPINE": "Spine",
    "TSPINE": "Spine",
    "LSPINE": "Spine",
    "PANCREAS": "Abdomen",
    "LIVER": "Abdomen",
    "KIDNEY": "Abdomen",
    "HAND": "Upper limb",
    "ARM": "Upper limb",
    "KNEE": "Lower limb",
    "LEG": "Lower limb",
    "FOOT": "Lower limb",
    "WHOLEBODY": "Whole body",
}


def body_part_region(part: str | None) -> str | None:
    """A DICOM BodyPartExamined value -> the BODY_REGIONS spelling where one matches; other values pass
    through unchanged (a dataset card's `body_region_map` may still map them); None when empty."""
    part = str(part or "").strip()
    if not part:
        return None
    upper = part.upper()
    return next((r for r in BODY_REGIONS if r.upper() == upper), DICOM_BODY_PARTS.get(upper, part))


def window(hu: np.ndarray, centre: float, width: float) -> np.ndarray:
    """HU -> uint8: `centre - width/2` -> 0, `centre + width/2` -> 255, linear, rounded to nearest."""
    lo = centre - width / 2.0
    x = (np.asarray(hu, dtype=np.float32) - lo) * (255.0 / width)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def ct_window(hu: np.ndarray, name_or_window: str | tuple[float, float]) -> np.ndarray:
    """Apply a window given by name (a key of :data:`CT_WINDOWS`) or as (centre, width)."""
    centre, width = CT_WINDOWS[name_or_window] if isinstance(name_or_window, str) else name_or_window
    return window(hu, centre, width)
