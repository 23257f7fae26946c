"""DICOM de-identification. It runs on the dataset right after it is read, before any value is used,
stored or logged: identifying tags are removed, UIDs replaced by salted hashes, private tags dropped.
Records then keep only an allow-list of technical tags (`technical_meta`), so a tag missed here still
cannot reach a record."""

from __future__ import annotations

import hashlib

from pydicom.dataset import Dataset

# The identifying attributes of DICOM PS3.15 Annex E (basic profile) that occur in practice.
PHI_KEYWORDS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "OtherPatientIDsSequence",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientBirthName",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "PatientMotherBirthName",
    "MilitaryRank",
    "BranchOfService",
    "MedicalRecordLocator",
    "EthnicGroup",
    "Occupation",
    "AdditionalPatientHistory",
    "PatientComments",
    "PatientInsurancePlanCodeSequence",
    "ResponsiblePerson",
    "ResponsibleOrganization",
    "CountryOfResidence",
    "RegionOfResidence",
    "CurrentPatientLocation",
    "PatientInstitutionResidence",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "InstitutionCodeSequence",
    "ReferringPhysicianName",
    "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansOfRecord",
    "RequestingPhysician",
    "OperatorsName",
    "ScheduledPerformingPhysicianName",
    "AccessionNumber",
    "StudyID",
    "StationName",
    "DeviceSerialNumber",
    "RequestAttributesSequence",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "StudyTime",
    "SeriesTime",
    "AcquisitionTime",
    "ContentTime",
    "AcquisitionDateTime",
    "InstanceCreationDate",
    "InstanceCreationTime",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "PerformedProcedureStepID",
    "ScheduledProcedureStepID",
    "RequestedProcedureID",
    "ImageComments",
    "StudyComments",
    "SeriesDescription",
    "StudyDescription",
    "ProtocolName",
    "DerivationDescription",
    "FrameComments",
    "TextValue",
    "PersonName",
    "ContentCreatorName",
    "InterpretationRecorder",
    "InterpretationAuthor",
    "ReviewerName",
)

# What a record may keep: technical, non-identifying acquisition parameters.
TECHNICAL_KEYWORDS: tuple[str, ...] = (
    "Modality",
    "BodyPartExamined",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "PixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "PhotometricInterpretation",
    "BitsStored",
    "RescaleSlope",
    "RescaleIntercept",
    "WindowCenter",
    "WindowWidth",
    "MagneticFieldStrength",
    "KVP",
    "ImageType",
    "SOPClassUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
)


def _hash_uid(uid: str, salt: str) -> str:
    # Deterministic (a series keeps one pseudonymous UID across re-runs) but not reversible without the salt.
    return "2.25." + str(int(hashlib.sha256(f"{salt}|{uid}".encode()).hexdigest()[:30], 16))


def deidentify(ds: Dataset, salt: str = "medvl") -> Dataset:
    """De-identify `ds` in place (and return it). Sequences are walked so nested PHI goes too."""
    ds.remove_private_tags()

    def walk(d: Dataset) -> None:
        for kw in PHI_KEYWORDS:
            if kw in d:
                delattr(d, kw)
        for elem in list(d):
            if elem.VR == "UI" and elem.keyword not in ("SOPClassUID", "TransferSyntaxUID") and elem.value:
                if elem.VM > 1:
                    elem.value = [_hash_uid(str(v), salt) for v in elem.value]
                else:
                    elem.value = _hash_uid(str(elem.value), salt)
            elif elem.VR == "PN" or elem.VR in ("DA", "DT", "TM"):
                del d[elem.tag]  # any remaining person name or date, whatever its keyword
            elif elem.VR == "SQ":
                for item in elem.value:
                    walk(item)

    walk(ds)
    if (
        "file_meta" in ds.__dict__
        and ds.file_meta is not None
        and "MediaStorageSOPInstanceUID" in ds.file_meta
    ):
        ds.file_meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "")
    ds.PatientIdentityRemoved = "YES"
    return ds


def technical_meta(ds: Dataset) -> dict:
    """The allow-listed technical tags of an already de-identified dataset, as JSON-ready values."""
    out = {}
    for kw in TECHNICAL_KEYWORDS:
        v = ds.get(kw)
        if v is None or v == "":
            continue
        out[kw] = [_plain(x) for x in v] if hasattr(v, "__iter__") and not isinstance(v, str) else _plain(v)
    return out


def _plain(v):
    return v if isinstance(v, int | float) else str(v)
