"""Synthetic DICOM archives for demos, tests and benchmarks."""

from cohort.synth.archive import SCANNERS, DemoArchive, PatientTruth, Scanner, write_demo_archive

__all__ = ["SCANNERS", "DemoArchive", "PatientTruth", "Scanner", "write_demo_archive"]
