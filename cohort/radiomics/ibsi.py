"""IBSI-1 reference values and pyradiomics: feature mapping, configurations, comparison table.

The Image Biomarker Standardisation Initiative (IBSI, Zwanenburg et al., Radiology
2020; reference manual arXiv:1612.07003) publishes consensus values for a digital
phantom and for a CT phantom under five processing configurations (A–E). This
module states, once, how the platform's pyradiomics features relate to them:

* :data:`FEATURE_MAP` maps pyradiomics feature names (``original_firstorder_Mean``)
  to IBSI tags without aggregation suffix (``stat_mean``), with the offset that
  converts a pyradiomics convention to the IBSI one where the two differ by
  definition only (kurtosis: pyradiomics reports ``excess kurtosis + 3``).
* :data:`CONFIGURATIONS` gives, for the IBSI configurations the tests reproduce,
  the pyradiomics settings that correspond to the IBSI processing, and which IBSI
  texture aggregation (``_3D_avg``, ``_2_5D_comb``, …) each pyradiomics run yields.
* :data:`KNOWN_DEVIATIONS` lists, with the reason, the IBSI values pyradiomics
  does not reproduce. Everything else is expected within the IBSI tolerance.
* :func:`comparison_table` lines up reference, tolerance and computed value.

How pyradiomics aggregates texture matrices, in IBSI terms: matrices are built
per direction over the whole ROI and features averaged over directions (IBSI
``avg``); ``weightingNorm: no_weighting`` sums the direction matrices first (IBSI
``comb``, "merged"); ``force2D`` restricts neighbours to the slice plane but pools
all slices into one matrix (IBSI ``2_5D``). IBSI ``2D`` aggregation (features per
slice, then averaged over slices) has no pyradiomics counterpart.

Nothing here reads files or calls pyradiomics except :func:`read_reference`, which
reads one reference CSV when called; everything else is pure data and functions.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

#: Prefix pyradiomics puts before every feature of the unfiltered image.
IMAGE_TYPE_PREFIX = "original_"

#: IBSI aggregation suffixes, longest first so that parsing is unambiguous.
AGGREGATION_SUFFIXES = (
    "_2_5D_avg",
    "_2_5D_comb",
    "_2D_avg",
    "_2D_comb",
    "_3D_avg",
    "_3D_comb",
    "_2_5D",
    "_2D",
    "_3D",
)

#: Significant digits to which IBSI reports its consensus values.
REFERENCE_SIGNIFICANT_DIGITS = 3


@dataclass(frozen=True)
class FeatureMapping:
    """One pyradiomics feature and the IBSI feature it computes.

    ``ibsi`` is the IBSI tag without aggregation suffix; its family prefix
    (``cm``, ``stat``, ...) decides which suffix a run gives it. The IBSI value is
    ``pyradiomics value + offset``.
    """

    pyradiomics: str  # "<class>_<feature>", e.g. "glcm_JointAverage"
    ibsi: str  # e.g. "cm_joint_avg"
    offset: float = 0.0
    note: str = ""

    @property
    def feature_class(self) -> str:
        return self.pyradiomics.split("_", 1)[0]

    @property
    def feature_name(self) -> str:
        return self.pyradiomics.split("_", 1)[1]

    @property
    def family(self) -> str:
        return self.ibsi.split("_", 1)[0]

    @property
    def result_key(self) -> str:
        """The key of this feature in :func:`cohort.radiomics.extract.extract_features` output."""
        return IMAGE_TYPE_PREFIX + self.pyradiomics


def _family(cls: str, pairs: str, note: str = "") -> tuple[FeatureMapping, ...]:
    """Mappings from a compact "PyradiomicsName ibsi_tag" per line listing."""
    out = []
    for line in pairs.strip().splitlines():
        name, tag = line.split()
        out.append(FeatureMapping(f"{cls}_{name}", tag, note=note))
    return tuple(out)


_EQUAL_BY_DEFINITION = "pyradiomics documents the two as mathematically equal"

#: pyradiomics feature -> IBSI feature. A pyradiomics feature may appear more than
#: once where IBSI lists two names for one quantity. IBSI features absent here
#: (local intensity peaks, intensity-volume histogram, most intensity-histogram
#: statistics, distance-zone matrix, Moran's I, bounding-box densities, ...) have
#: no pyradiomics counterpart and are not compared.
FEATURE_MAP: tuple[FeatureMapping, ...] = (
    *_family(
        "shape",
        """
        MeshVolume morph_volume
        VoxelVolume morph_vol_approx
        SurfaceArea morph_area_mesh
        SurfaceVolumeRatio morph_av
        Compactness1 morph_comp_1
        Compactness2 morph_comp_2
        SphericalDisproportion morph_sph_dispr
        Sphericity morph_sphericity
        Maximum3DDiameter morph_diam
        MajorAxisLength morph_pca_maj_axis
        MinorAxisLength morph_pca_min_axis
        LeastAxisLength morph_pca_least_axis
        Elongation morph_pca_elongation
        Flatness morph_pca_flatness
        """,
    ),
    FeatureMapping(
        "shape_SphericalDisproportion",
        "morph_asphericity",
        offset=-1.0,
        note="IBSI asphericity = spherical disproportion - 1",
    ),
    *_family(
        "firstorder",
        """
        Mean stat_mean
        Variance stat_var
        Skewness stat_skew
        Median stat_median
        Minimum stat_min
        10Percentile stat_p10
        90Percentile stat_p90
        Maximum stat_max
        InterquartileRange stat_iqr
        Range stat_range
        MeanAbsoluteDeviation stat_mad
        RobustMeanAbsoluteDeviation stat_rmad
        Energy stat_energy
        RootMeanSquared stat_rms
        Entropy ih_entropy
        Uniformity ih_uniformity
        """,
    ),
    FeatureMapping(
        "firstorder_Kurtosis",
        "stat_kurt",
        offset=-3.0,
        note="pyradiomics reports kurtosis, IBSI excess kurtosis (kurtosis - 3)",
    ),
    FeatureMapping(
        "firstorder_Uniformity",
        "ngl_glnu_norm",
        note="NGLDM grey level non-uniformity (normalised) is first-order uniformity; "
        + _EQUAL_BY_DEFINITION,
    ),
    *_family(
        "glcm",
        """
        MaximumProbability cm_joint_max
        JointAverage cm_joint_avg
        SumSquares cm_joint_var
        JointEntropy cm_joint_entr
        DifferenceAverage cm_diff_avg
        DifferenceVariance cm_diff_var
        DifferenceEntropy cm_diff_entr
        SumAverage cm_sum_avg
        ClusterTendency cm_sum_var
        SumEntropy cm_sum_entr
        JointEnergy cm_energy
        Contrast cm_contrast
        Id cm_inv_diff
        Idn cm_inv_diff_norm
        Idm cm_inv_diff_mom
        Idmn cm_inv_diff_mom_norm
        InverseVariance cm_inv_var
        Correlation cm_corr
        Autocorrelation cm_auto_corr
        ClusterTendency cm_clust_tend
        ClusterShade cm_clust_shade
        ClusterProminence cm_clust_prom
        Imc1 cm_info_corr1
        Imc2 cm_info_corr2
        """,
    ),
    FeatureMapping(
        "glcm_DifferenceAverage", "cm_dissimilarity", note="dissimilarity; " + _EQUAL_BY_DEFINITION
    ),
    *_family(
        "glrlm",
        """
        ShortRunEmphasis rlm_sre
        LongRunEmphasis rlm_lre
        LowGrayLevelRunEmphasis rlm_lgre
        HighGrayLevelRunEmphasis rlm_hgre
        ShortRunLowGrayLevelEmphasis rlm_srlge
        ShortRunHighGrayLevelEmphasis rlm_srhge
        LongRunLowGrayLevelEmphasis rlm_lrlge
        LongRunHighGrayLevelEmphasis rlm_lrhge
        GrayLevelNonUniformity rlm_glnu
        GrayLevelNonUniformityNormalized rlm_glnu_norm
        RunLengthNonUniformity rlm_rlnu
        RunLengthNonUniformityNormalized rlm_rlnu_norm
        RunPercentage rlm_r_perc
        GrayLevelVariance rlm_gl_var
        RunVariance rlm_rl_var
        RunEntropy rlm_rl_entr
        """,
    ),
    *_family(
        "glszm",
        """
        SmallAreaEmphasis szm_sze
        LargeAreaEmphasis szm_lze
        LowGrayLevelZoneEmphasis szm_lgze
        HighGrayLevelZoneEmphasis szm_hgze
        SmallAreaLowGrayLevelEmphasis szm_szlge
        SmallAreaHighGrayLevelEmphasis szm_szhge
        LargeAreaLowGrayLevelEmphasis szm_lzlge
        LargeAreaHighGrayLevelEmphasis szm_lzhge
        GrayLevelNonUniformity szm_glnu
        GrayLevelNonUniformityNormalized szm_glnu_norm
        SizeZoneNonUniformity szm_zsnu
        SizeZoneNonUniformityNormalized szm_zsnu_norm
        ZonePercentage szm_z_perc
        GrayLevelVariance szm_gl_var
        ZoneVariance szm_zs_var
        ZoneEntropy szm_zs_entr
        """,
    ),
    *_family(
        "ngtdm",
        """
        Coarseness ngt_coarseness
        Contrast ngt_contrast
        Busyness ngt_busyness
        Complexity ngt_complexity
        Strength ngt_strength
        """,
    ),
    *_family(
        "gldm",
        """
        SmallDependenceEmphasis ngl_lde
        LargeDependenceEmphasis ngl_hde
        LowGrayLevelEmphasis ngl_lgce
        HighGrayLevelEmphasis ngl_hgce
        SmallDependenceLowGrayLevelEmphasis ngl_ldlge
        SmallDependenceHighGrayLevelEmphasis ngl_ldhge
        LargeDependenceLowGrayLevelEmphasis ngl_hdlge
        LargeDependenceHighGrayLevelEmphasis ngl_hdhge
        GrayLevelNonUniformity ngl_glnu
        DependenceNonUniformity ngl_dcnu
        DependenceNonUniformityNormalized ngl_dcnu_norm
        GrayLevelVariance ngl_gl_var
        DependenceVariance ngl_dc_var
        DependenceEntropy ngl_dc_entr
        """,
        note="pyradiomics GLDM with alpha 0 and distance 1 is the IBSI NGLDM",
    ),
)


@dataclass(frozen=True)
class Run:
    """One pyradiomics extraction of a configuration and the IBSI tags it yields.

    ``suffixes`` maps each IBSI family taken from this run to the aggregation
    suffix its tags carry in the reference (``""`` for families without one).
    ``settings`` are added to the configuration's settings for this run.
    """

    label: str
    suffixes: Mapping[str, str]
    settings: Mapping[str, Any] = field(default_factory=dict)


_NO_SUFFIX = {"morph": "", "stat": "", "ih": ""}
_FORCE_2D = {"force2D": True, "force2Ddimension": 0}  # neighbours in the axial (z) plane only
_MERGED = {"weightingNorm": "no_weighting"}  # sum direction matrices before computing features

RUN_3D = Run(
    "3D", {**_NO_SUFFIX, "cm": "_3D_avg", "rlm": "_3D_avg", "szm": "_3D", "ngt": "_3D", "ngl": "_3D"}
)
RUN_3D_COMB = Run("3D merged", {"cm": "_3D_comb", "rlm": "_3D_comb"}, _MERGED)
RUN_2_5D = Run(
    "2.5D", {"cm": "_2_5D_avg", "rlm": "_2_5D_avg", "szm": "_2_5D", "ngt": "_2_5D", "ngl": "_2_5D"}, _FORCE_2D
)
RUN_2_5D_WITH_MORPH = Run("2.5D", {**_NO_SUFFIX, **RUN_2_5D.suffixes}, _FORCE_2D)
RUN_2_5D_COMB = Run("2.5D merged", {"cm": "_2_5D_comb", "rlm": "_2_5D_comb"}, {**_FORCE_2D, **_MERGED})


@dataclass(frozen=True)
class IbsiConfiguration:
    """An IBSI-1 test case expressed as pyradiomics settings."""

    name: str
    reference_file: str  # in ``ibsi/reference_values/``
    description: str
    settings: Mapping[str, Any]
    runs: tuple[Run, ...]


#: Settings every IBSI run shares: the ROI is label 1, energy is computed on the
#: unshifted intensities (IBSI has no shift), shape features use the mask before
#: intensity re-segmentation (IBSI's morphological mask).
_COMMON: dict[str, Any] = {"label": 1, "voxelArrayShift": 0, "resegmentShape": False}

CONFIGURATIONS: dict[str, IbsiConfiguration] = {
    "digital_phantom": IbsiConfiguration(
        name="digital_phantom",
        reference_file="ibsi_1_dig_phantom.csv",
        description=(
            "IBSI digital phantom (5x4x4 voxels of 2 mm, grey levels 1..6 inside the mask): already "
            "discretised, so no interpolation, no re-segmentation and a fixed bin width of 1 whose "
            "bins start at the ROI minimum 1 (grey level n stays n). 3D and 2.5D aggregation."
        ),
        settings={**_COMMON, "binWidth": 1},
        runs=(RUN_3D, RUN_3D_COMB, RUN_2_5D, RUN_2_5D_COMB),
    ),
    "A": IbsiConfiguration(
        name="A",
        reference_file="ibsi_1_chest_config_a.csv",
        description=(
            "IBSI CT phantom, configuration A: slice-wise (2D) processing, no interpolation, "
            "re-segmentation to [-500, 400] HU, fixed bin size 25 HU. pyradiomics bins start at the "
            "ROI minimum rounded down to a multiple of 25, which is -500 here, as in IBSI."
        ),
        settings={**_COMMON, "binWidth": 25, "resegmentRange": [-500, 400]},
        runs=(RUN_2_5D_WITH_MORPH, RUN_2_5D_COMB),
    ),
    "B": IbsiConfiguration(
        name="B",
        reference_file="ibsi_1_chest_config_b.csv",
        description=(
            "IBSI CT phantom, configuration B: slice-wise (2D) processing, in-plane (bi)linear "
            "interpolation to 2 x 2 mm keeping the 3 mm slices, re-segmentation to [-500, 400] HU, "
            "fixed bin number 32."
        ),
        settings={
            **_COMMON,
            "binCount": 32,
            "resegmentRange": [-500, 400],
            "resampledPixelSpacing": [2, 2, 0],  # 0: keep the slice spacing
            "interpolator": "sitkLinear",
        },
        runs=(RUN_2_5D_WITH_MORPH, RUN_2_5D_COMB),
    ),
}


@dataclass(frozen=True)
class KnownDeviation:
    """IBSI values pyradiomics is known not to reproduce, and why.

    ``tags`` are shell-style patterns (:mod:`fnmatch`) over full IBSI tags;
    ``configurations`` names the configurations it applies to.
    """

    configurations: tuple[str, ...]
    tags: tuple[str, ...]
    reason: str

    def applies(self, configuration: str, tag: str) -> bool:
        return configuration in self.configurations and any(fnmatch.fnmatchcase(tag, p) for p in self.tags)


#: Reason recorded for IBSI tags whose aggregation no pyradiomics run yields.
NOT_COMPUTED_2D = (
    "IBSI 2D aggregation (features per slice, averaged over slices) is not implemented in "
    "pyradiomics; force2D pools all slices into one matrix, which is IBSI 2.5D (compared instead)"
)

#: Deviations that remain after the mapping and settings above, each with its reason.
#: Definitional differences that a constant removes are not listed here but handled
#: by :attr:`FeatureMapping.offset` (kurtosis, asphericity).
KNOWN_DEVIATIONS: tuple[KnownDeviation, ...] = (
    KnownDeviation(
        configurations=("digital_phantom",),
        tags=("morph_pca_maj_axis", "morph_pca_min_axis", "morph_pca_least_axis"),
        reason=(
            "pyradiomics takes the eigenvalues of the population covariance (divided by N) of the "
            "voxel positions, the IBSI values correspond to the sample covariance (divided by N - 1): "
            "axis lengths are sqrt((N - 1) / N) = 0.993 of IBSI's for the 74-voxel phantom (minor and "
            "least axis fall outside tolerance, the major axis just inside; elongation and flatness, "
            "ratios, are unaffected; negligible for the CT phantom's 125 256 voxels)"
        ),
    ),
    KnownDeviation(
        configurations=("B",),
        tags=(
            "ih_*",
            "cm_*",
            "rlm_*",
            "szm_*",
            "ngt_*",
            "ngl_*",
            "morph_comp_2",
            "morph_asphericity",
            "morph_pca_flatness",
        ),
        reason=(
            "pyradiomics interpolates differently from IBSI. Mainly its grid: pyradiomics starts the "
            "new grid at the corner of the original image, IBSI centres it on the original grid, so "
            "every 2 mm voxel samples other points. Also the mask is resampled by nearest neighbour "
            "(IBSI: linear interpolation, kept where >= 0.5) and the platform's int16 CT is resampled "
            "into int16, i.e. truncated towards zero (IBSI: rounded). The ROI's re-segmented maximum "
            "becomes 395 instead of 391 HU, which moves every fixed-bin-number (32) bin edge, and "
            "features of the discretised intensities leave IBSI's narrow tolerances. With the grid "
            "centred, mask and rounding as IBSI, the same extraction reproduces all values "
            "(tests/radiomics/test_ibsi.py)"
        ),
    ),
)


def deviation_for(configuration: str, tag: str) -> str:
    """The reason of the known deviation covering ``tag`` in ``configuration``, or ``""``."""
    reasons = [d.reason for d in KNOWN_DEVIATIONS if d.applies(configuration, tag)]
    return "; ".join(reasons)


def split_tag(tag: str) -> tuple[str, str]:
    """``"cm_joint_max_2_5D_avg"`` -> ``("cm_joint_max", "_2_5D_avg")``; no suffix -> ``(tag, "")``."""
    for suffix in AGGREGATION_SUFFIXES:
        if tag.endswith(suffix):
            return tag[: -len(suffix)], suffix
    return tag, ""


def pyradiomics_params(config: IbsiConfiguration, run: Run) -> dict[str, Any]:
    """pyradiomics parameters of one run: the configuration's settings, the run's, and
    exactly the mapped features of the IBSI families the run is used for (so deprecated
    but mapped features such as ``Compactness1`` are computed as well)."""
    classes: dict[str, list[str]] = {}
    for mapping in FEATURE_MAP:
        if mapping.family in run.suffixes:
            names = classes.setdefault(mapping.feature_class, [])
            if mapping.feature_name not in names:
                names.append(mapping.feature_name)
    return {
        "setting": {**config.settings, **run.settings},
        "imageType": {"Original": {}},
        "featureClass": classes,
    }


def read_reference(path: str | Path) -> pd.DataFrame:
    """An IBSI reference CSV (``reference value;tolerance;tag``) as a frame indexed by tag,
    with float columns ``reference`` and ``tolerance``; tags without a value are dropped."""
    frame = pd.read_csv(path, sep=";")
    frame.columns = ["reference", "tolerance", "tag"]
    frame = frame.dropna(subset=["reference"])
    frame["tolerance"] = frame["tolerance"].fillna(0.0)
    return frame.astype({"reference": float, "tolerance": float}).set_index("tag")


def rounding_allowance(reference: float, digits: int = REFERENCE_SIGNIFICANT_DIGITS) -> float:
    """Half a unit in the last reported digit of an IBSI value given to ``digits`` significant digits.

    IBSI reports tolerance 0 for values every team matched exactly; the value itself
    is rounded, so "within tolerance" means "rounds to the reference".
    """
    if reference == 0 or not math.isfinite(reference):
        return 0.0
    return 0.5 * 10.0 ** (math.floor(math.log10(abs(reference))) - digits + 1)


def allowed_difference(reference: float, tolerance: float) -> float:
    """The largest accepted ``|value - reference|``: the IBSI tolerance, but at least the
    :func:`rounding_allowance` of the reported reference value."""
    return max(tolerance, rounding_allowance(reference))


def within_tolerance(value: float, reference: float, tolerance: float) -> bool:
    """Whether ``value`` agrees with an IBSI reference value and tolerance (NaN never does)."""
    if not math.isfinite(value):
        return False
    allowed = allowed_difference(reference, tolerance)
    # a relative 1e-9 absorbs float noise in values that sit exactly on the bound
    return abs(value - reference) <= allowed * (1 + 1e-9) + 1e-12 * max(1.0, abs(reference))


TABLE_COLUMNS = (
    "ibsi_tag",
    "pyradiomics_feature",
    "run",
    "reference",
    "tolerance",
    "allowed",
    "value",
    "difference",
    "within_tolerance",
    "status",
    "deviation",
    "note",
)


def comparison_table(
    config: IbsiConfiguration, features: Mapping[str, Mapping[str, float]], reference: pd.DataFrame
) -> pd.DataFrame:
    """One row per IBSI reference value that a mapped pyradiomics feature addresses.

    ``features`` holds the output of :func:`~cohort.radiomics.extract.extract_features`
    per run label of ``config``. ``value`` is in IBSI convention (offset applied);
    ``allowed`` is :func:`allowed_difference`.
    ``status`` is ``pass``, ``fail``, ``known deviation`` (outside tolerance and on
    :data:`KNOWN_DEVIATIONS`), ``deviation listed, passes`` or ``not computed``
    (an IBSI aggregation no pyradiomics run yields; ``value`` is NaN).
    """
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for run in config.runs:
        values = features.get(run.label, {})
        for mapping in FEATURE_MAP:
            if mapping.family not in run.suffixes:
                continue
            tag = mapping.ibsi + run.suffixes[mapping.family]
            if tag not in reference.index or tag in seen:
                continue
            seen.add(tag)
            ref = float(reference.at[tag, "reference"])
            tol = float(reference.at[tag, "tolerance"])
            allowed = allowed_difference(ref, tol)
            value = float(values.get(mapping.result_key, math.nan)) + mapping.offset
            ok = within_tolerance(value, ref, tol)
            deviation = deviation_for(config.name, tag)
            status = "pass" if ok and not deviation else "fail" if not deviation else "known deviation"
            if ok and deviation:
                status = "deviation listed, passes"
            rows.append(
                {
                    "ibsi_tag": tag,
                    "pyradiomics_feature": mapping.result_key,
                    "run": run.label,
                    "reference": ref,
                    "tolerance": tol,
                    "allowed": allowed,
                    "value": value,
                    "difference": value - ref,
                    "within_tolerance": ok,
                    "status": status,
                    "deviation": deviation,
                    "note": mapping.note,
                }
            )
    mapped = {m.ibsi: m for m in FEATURE_MAP}
    for tag in reference.index:
        base, suffix = split_tag(str(tag))
        if tag in seen or base not in mapped or not suffix:
            continue
        mapping = mapped[base]
        rows.append(
            {
                "ibsi_tag": tag,
                "pyradiomics_feature": mapping.result_key,
                "run": "",
                "reference": float(reference.at[tag, "reference"]),
                "tolerance": float(reference.at[tag, "tolerance"]),
                "allowed": math.nan,
                "value": math.nan,
                "difference": math.nan,
                "within_tolerance": False,
                "status": "not computed",
                "deviation": NOT_COMPUTED_2D if suffix.startswith("_2D") else "aggregation not run",
                "note": mapping.note,
            }
        )
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def summary(table: pd.DataFrame) -> dict[str, int]:
    """Row counts per status, plus ``compared`` (rows with a computed value)."""
    counts = {str(k): int(v) for k, v in table["status"].value_counts().items()}
    counts["compared"] = int((table["status"] != "not computed").sum())
    return counts
