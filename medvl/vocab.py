"""Controlled vocabularies shared by every stage (curation, synthesis, generation, evaluation).

They follow GMAI-VL (../shared/reference/001_9286ae9cdc6204fa.txt, §3.1 and Fig. 3): 13 imaging
modalities, 18 clinical departments, the four original task types and the clinical tasks. The paper's
text names only some departments of Fig. 3c; the full list below is the 18 departments that the same
group's GMAI-MMBench uses, so that curated data and benchmark breakdowns share one vocabulary.
"""

from __future__ import annotations

MODALITIES: tuple[str, ...] = (
    "CT",
    "MR",
    "X-ray",
    "PET",
    "Ultrasound",
    "Fundus photography",
    "OCT",
    "Endoscopy",
    "Dermoscopy",
    "Histopathology",
    "Microscopy",
    "Colposcopy",
    "Infrared reflectance imaging",
)

# Spellings seen in public datasets, mapped onto the vocabulary (keys compared case-insensitively).
MODALITY_ALIASES: dict[str, str] = {
    "mri": "MR",
    "mr": "MR",
    "ct": "CT",
    "x-ray": "X-ray",
    "xray": "X-ray",
    "cr": "X-ray",
    "dx": "X-ray",
    "radiograph": "X-ray",
    "pt": "PET",
    "us": "Ultrasound",
    "ultrasound": "Ultrasound",
    "fundus": "Fundus photography",
    "pathology": "Histopathology",
    "histology": "Histopathology",
    "dermoscopy": "Dermoscopy",
    "endoscopy": "Endoscopy",
}

DEPARTMENTS: tuple[str, ...] = (
    "Cardiovascular Surgery",
    "Dermatology",
    "Endocrinology",
    "Gastroenterology and Hepatology",
    "General Surgery",
    "Hematology",
    "Infectious Diseases",
    "Laboratory Medicine and Pathology",
    "Nephrology",
    "Neurosurgery",
    "Obstetrics and Gynecology",
    "Oncology",
    "Ophthalmology",
    "Orthopedic Surgery",
    "Otolaryngology",
    "Pulmonary Medicine",
    "Urology",
    "Dentistry",
)

ORIGINAL_TASKS: tuple[str, ...] = (
    "2D classification",
    "2D detection",
    "2D segmentation",
    "3D segmentation",
    "video",
)

CLINICAL_TASKS: tuple[str, ...] = (
    "Disease Diagnosis",
    "Organ Recognition",
    "Lesion Grading",
    "Attribute Recognition",
    "Bone Recognition",
    "Muscle Recognition",
    "Nervous Tissue Recognition",
    "Blood Vessel Recognition",
    "Cell Recognition",
    "Microorganism Recognition",
    "Counting",
    "Image Quality Grading",
    "Surgical Instrument Recognition",
    "Surgical Workflow Recognition",
)

# Body regions a record can name (curation maps each source's spelling onto these; the CT display
# window is chosen from them).
BODY_REGIONS: tuple[str, ...] = (
    "Head",
    "Neck",
    "Chest",
    "Breast",
    "Abdomen",
    "Pelvis",
    "Spine",
    "Upper limb",
    "Lower limb",
    "Eye",
    "Oral cavity",
    "Skin",
    "Whole body",
    "Cell",
)

# The five question types of OmniMedVQA (reference Table 3), used by the synthetic benchmark and
# the OmniMedVQA breakdown.
OMNIMEDVQA_QUESTION_TYPES: tuple[str, ...] = (
    "Modality Recognition",
    "Anatomy Identification",
    "Disease Diagnosis",
    "Lesion Grading",
    "Other Biological Attributes",
)


def normalize_modality(name: str) -> str:
    """Map a dataset's modality spelling onto :data:`MODALITIES`; raise ``ValueError`` if unknown."""
    if name in MODALITIES:
        return name
    key = name.strip().lower()
    for m in MODALITIES:
        if m.lower() == key:
            return m
    if key in MODALITY_ALIASES:
        return MODALITY_ALIASES[key]
    raise ValueError(f"unknown modality {name!r}; expected one of {', '.join(MODALITIES)} (or an alias)")


def check_department(name: str) -> str:
    if name not in DEPARTMENTS:
        raise ValueError(f"unknown department {name!r}; expected one of {', '.join(DEPARTMENTS)}")
    return name
