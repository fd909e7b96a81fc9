"""Pixel decoding plugins: which transfer syntaxes decode, and that they decode right."""

from __future__ import annotations

import warnings

import numpy as np
import pydicom
import pytest
from pydicom import uid

from cohort.index.codecs import can_decode, codec_table, decodable_transfer_syntaxes
from tests.index.files import PYDICOM_DATA

TEST_FILES = PYDICOM_DATA / "test_files"

#: The compressed syntaxes an archive of CT/MR/PET/RT data holds, each with a pinned plugin.
REQUIRED = {
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.HTJ2KLossless,
    uid.RLELossless,
    uid.DeflatedExplicitVRLittleEndian,
}

#: Compressed files pydicom ships that no decoder reads, and why (pydicom's own tests expect it).
UNDECODABLE = {
    "JPEG-lossy.dcm": "non-conformant scan header (libjpeg rejects it; Pillow has no 12-bit JPEG)",
    "JPEG2000-embedded-sequence-delimiter.dcm": "a test of fragment parsing, not a decodable codestream",
}

#: (compressed file, uncompressed or lossless reference, largest allowed absolute difference).
REFERENCES = [
    ("MR_small_RLE.dcm", "MR_small.dcm", 0),
    ("MR_small_jp2klossless.dcm", "MR_small.dcm", 0),
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm", 0),
    ("rtdose_rle.dcm", "rtdose.dcm", 0),
    ("rtdose_rle_1frame.dcm", "rtdose_1frame.dcm", 0),
    ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle.dcm", 0),  # JPEG lossless SV1 against RLE
    ("SC_rgb_gdcm_KY.dcm", "SC_rgb_rle.dcm", 0),  # JPEG 2000 (lossy syntax, lossless stream)
    ("SC_rgb_jls_lossy_line.dcm", "SC_rgb_rle.dcm", 2),  # JPEG-LS NEAR = 2
    ("SC_rgb_jls_lossy_sample.dcm", "SC_rgb_rle.dcm", 2),
    ("SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle.dcm", 6),  # JPEG baseline, lossy
    ("SC_rgb_dcmtk_+eb+cr.dcm", "SC_rgb_rle.dcm", 1),
    ("SC_rgb_small_odd_jpeg.dcm", "SC_rgb_small_odd.dcm", 4),
]


def _pixels(name: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(pydicom.dcmread(TEST_FILES / name).pixel_array)


def test_the_pinned_plugins_decode_every_syntax_an_archive_holds() -> None:
    assert REQUIRED <= decodable_transfer_syntaxes()
    table = {c.transfer_syntax_uid: c for c in codec_table()}
    assert "pylibjpeg" in table[uid.JPEGLosslessSV1].plugins
    assert "pyjpegls" in table[uid.JPEGLSLossless].plugins
    assert not can_decode(uid.MPEG2MPML) and not can_decode("1.2.3.4.private") and not can_decode(None)
    assert table[uid.MPEG2MPML].available is False


def _transfer_syntax(name: str) -> str | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = pydicom.dcmread(TEST_FILES / name, stop_before_pixels=True).file_meta.get("TransferSyntaxUID")
    return None if ts is None else str(ts)


def _compressed_files() -> list[str]:
    names = []
    for path in sorted(TEST_FILES.glob("*.dcm")):
        if path.read_bytes()[128:132] != b"DICM":
            continue
        ts = _transfer_syntax(path.name)
        if ts is not None and uid.UID(ts).is_compressed and can_decode(ts):
            names.append(path.name)
    return names


COMPRESSED = _compressed_files()


def test_the_corpus_covers_every_compression_family() -> None:
    syntaxes = {_transfer_syntax(n) for n in COMPRESSED}
    families = {uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLosslessSV1, uid.JPEGLSLossless}
    families |= {uid.JPEGLSNearLossless, uid.JPEG2000Lossless, uid.JPEG2000, uid.RLELossless}
    assert families <= syntaxes and len(COMPRESSED) >= 40


@pytest.mark.parametrize("name", COMPRESSED)
def test_each_compressed_test_file_decodes(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(TEST_FILES / name)
        if "PixelData" not in ds:
            pytest.skip(f"{name} has no pixel data")
        if name in UNDECODABLE:
            with pytest.raises((RuntimeError, ValueError)):
                _ = ds.pixel_array
            return
        pixels = ds.pixel_array
    frames = int(ds.get("NumberOfFrames") or 1)
    shape = (frames,) if frames > 1 else ()
    shape += (ds.Rows, ds.Columns) + ((ds.SamplesPerPixel,) if ds.SamplesPerPixel > 1 else ())
    assert pixels.shape == shape


@pytest.mark.parametrize(("compressed", "reference", "tolerance"), REFERENCES)
def test_decoded_pixels_match_the_reference(compressed: str, reference: str, tolerance: int) -> None:
    decoded, expected = _pixels(compressed), _pixels(reference)
    assert decoded.shape == expected.shape
    difference = np.abs(decoded.astype(np.int64) - expected.astype(np.int64))
    assert difference.max() <= tolerance
    if tolerance:
        assert difference.mean() < 1.6  # lossy, but close everywhere
