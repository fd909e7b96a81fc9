"""Radiomics: pyradiomics extraction per (image, mask), with settings hashing."""

from cohort.radiomics.extract import (
    extract_features,
    feature_set_name,
    get_extractor,
    validate_params,
)

__all__ = ["extract_features", "feature_set_name", "get_extractor", "validate_params"]
