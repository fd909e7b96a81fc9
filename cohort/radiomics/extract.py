"""pyradiomics extraction for one (image, mask) pair.

One extractor per worker process and parameter set (cached), because building
one validates the parameter schema each time. The platform switches off
pyradiomics' diagnostics (``additionalInfo``): they hash the image and mask on
every call (~0.6 s on a planning CT) and the platform already records content
hashes of every input file in the provenance columns.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk

from cohort.errors import RadiomicsError, SpecError
from cohort.radiomics.crop import crop_for_extraction, estimate_case_bytes
from cohort.radiomics.resample import resample_ibsi

#: Settings the platform imposes on every extractor; they change no feature value.
FORCED_SETTINGS: dict[str, Any] = {"additionalInfo": False}


def _with_forced(params: Mapping[str, Any]) -> dict[str, Any]:
    merged = json.loads(json.dumps(params))
    merged.setdefault("setting", {})
    if merged["setting"] is None:
        merged["setting"] = {}
    merged["setting"].update(FORCED_SETTINGS)
    return merged


def _quiet_radiomics() -> None:
    import radiomics

    radiomics.setVerbosity(logging.ERROR)
    logging.getLogger("radiomics").setLevel(logging.ERROR)
    logging.getLogger("pykwalify").setLevel(logging.CRITICAL)


def validate_params(params: Mapping[str, Any], *, source: str = "<params>") -> None:
    """Raise :class:`SpecError` if pyradiomics rejects the parameters."""
    if not isinstance(params, Mapping):
        raise SpecError("radiomics parameters must be a mapping", subject=source)
    try:
        get_extractor(json.dumps(_with_forced(params), sort_keys=True))
    except SpecError:
        raise
    except Exception as exc:  # pykwalify raises SchemaError with a readable message
        raise SpecError(
            f"radiomics parameters rejected by pyradiomics: {exc}. Keys allowed at the top "
            "level: setting, imageType, featureClass, voxelSetting",
            subject=source,
        ) from exc


@functools.lru_cache(maxsize=8)
def get_extractor(params_json: str) -> Any:
    """The (cached) extractor for a canonical JSON parameter string."""
    from radiomics.featureextractor import RadiomicsFeatureExtractor

    _quiet_radiomics()
    return RadiomicsFeatureExtractor(json.loads(params_json))


def feature_set_name(settings_hash: str) -> str:
    """Table name of a feature set in the store."""
    return f"radiomics-{settings_hash[:12]}"


def _resample_the_ibsi_way(
    image: sitk.Image, mask: sitk.Image, params: Mapping[str, Any]
) -> tuple[sitk.Image, sitk.Image, dict[str, Any]]:
    """IBSI interpolation by the platform; pyradiomics' own resampling switched off."""
    settings = dict(params.get("setting") or {})
    spacing = settings.pop("resampledPixelSpacing", None)
    settings.pop("interpolator", None)
    out = {**params, "setting": settings}
    if spacing is None:
        return image, mask, out
    image, mask = resample_ibsi(image, mask, spacing)
    return image, mask, out


def extract_features(
    image: sitk.Image,
    mask: sitk.Image,
    params: Mapping[str, Any],
    *,
    subject: str = "",
    crop: bool = True,
    max_case_mb: float | None = None,
    interpolation: Literal["pyradiomics", "ibsi"] = "pyradiomics",
) -> dict[str, float]:
    """Features of the voxels labelled ``setting.label`` (default 1) in ``mask``.

    Returns ``{feature name: float}`` in pyradiomics' naming
    (``original_firstorder_Mean``). With ``crop`` the image is first cropped to
    the ROI by the margin rule of :mod:`cohort.radiomics.crop`. With
    ``max_case_mb`` a case whose estimated memory exceeds the cap is refused
    before any work. Raises :class:`RadiomicsError` with the reason when the ROI
    is empty, the cap is exceeded or pyradiomics fails (ROI too small, empty
    after resampling, ...).
    """
    if interpolation == "ibsi":
        image, mask, params = _resample_the_ibsi_way(image, mask, params)
    run_params: Mapping[str, Any] = params
    if crop or max_case_mb is not None:
        try:
            cropped_image, cropped_mask, cropped_params, plan = crop_for_extraction(image, mask, params)
        except ValueError as exc:
            raise RadiomicsError(f"cannot crop to the ROI: {exc}", subject=subject) from exc
        if max_case_mb is not None:
            needed = estimate_case_bytes(plan, cropped_mask, params) / 2**20
            if needed > max_case_mb:
                raise RadiomicsError(
                    f"estimated {needed:.0f} MiB for this ROI exceeds the cap of {max_case_mb:.0f} MiB "
                    "(radiomics.max_case_mb); raise the cap, or resample coarser / enable fewer filters",
                    subject=subject,
                )
        if crop:
            image, mask, run_params = cropped_image, cropped_mask, cropped_params
    extractor = get_extractor(json.dumps(_with_forced(run_params), sort_keys=True))
    try:
        result = extractor.execute(image, mask)
    except Exception as exc:  # pyradiomics raises ValueError/AssertionError/RuntimeError
        raise RadiomicsError(f"pyradiomics failed: {type(exc).__name__}: {exc}", subject=subject) from exc
    features: dict[str, float] = {}
    for name, value in result.items():
        if name.startswith("diagnostics_"):
            continue
        try:
            features[name] = float(np.asarray(value))
        except (TypeError, ValueError) as exc:
            raise RadiomicsError(f"feature {name} is not a number: {value!r}", subject=subject) from exc
    if not features:
        raise RadiomicsError("pyradiomics returned no features", subject=subject)
    return features
