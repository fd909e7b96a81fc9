"""One small exception hierarchy for the whole platform.

Every exception carries structured fields (the stage it came from, the input it
concerns and the reason) so that a failed case can be written to the failures
table as data, not as a formatted string someone has to parse later.
"""

from __future__ import annotations

from enum import StrEnum


class Stage(StrEnum):
    """Pipeline stages, as recorded in failure rows and provenance."""

    SPEC = "spec"
    INDEX = "index"
    CURATE = "curate"
    MASK = "mask"
    HARMONISE = "harmonise"
    SEGMENT = "segment"
    RADIOMICS = "radiomics"
    STORE = "store"
    ANALYSIS = "analysis"


class CohortError(Exception):
    """Base class of every error the platform raises on purpose.

    ``subject`` names the file, series or ROI the error concerns; ``reason`` says
    what is wrong and, where possible, what to do next.
    """

    stage: Stage = Stage.SPEC

    def __init__(self, reason: str, *, subject: str = "") -> None:
        self.reason = reason
        self.subject = subject
        super().__init__(f"{subject}: {reason}" if subject else reason)


class SpecError(CohortError):
    """The cohort spec (or a radiomics parameter file) is invalid."""

    stage = Stage.SPEC


class DicomReadError(CohortError):
    """A file could not be read as DICOM."""

    stage = Stage.INDEX


class SeriesAssemblyError(CohortError):
    """The slices of a series do not make one consistent 3D volume."""

    stage = Stage.CURATE


class RTStructError(CohortError):
    """An RTSTRUCT (or one of its ROIs) cannot be turned into a mask."""

    stage = Stage.MASK


class HarmoniseError(CohortError):
    """An image harmonisation step cannot be applied (or would be refused) for one image."""

    stage = Stage.HARMONISE


class SegmentationError(CohortError):
    """Segmentation (lung isolation, metrics) cannot be computed for one case."""

    stage = Stage.SEGMENT


class RadiomicsError(CohortError):
    """Feature extraction failed for one (series, ROI)."""

    stage = Stage.RADIOMICS


class StoreError(CohortError):
    """The feature store cannot be read or written."""

    stage = Stage.STORE


class DeidentificationError(CohortError):
    """A DICOM object cannot be de-identified or written out safely."""

    stage = Stage.CURATE


class ConversionError(CohortError):
    """A volume cannot be written to (or read from) NIfTI/NRRD."""

    stage = Stage.CURATE


class ModelError(CohortError):
    """A segmentation model (manifest, ONNX file, runtime backend) cannot be loaded or run."""

    stage = Stage.SEGMENT
