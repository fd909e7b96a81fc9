"""Which transfer syntaxes this installation can decode, from pydicom's pixel decoder plugins.

A decoder plugin declares what it needs (pylibjpeg, pyjpegls, Pillow, GDCM ...)
and pydicom reports whether those are importable; nothing here decodes pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from pydicom import uid as dicom_uid
from pydicom.pixels import get_decoder


@dataclass(frozen=True)
class CodecStatus:
    """Decoding support for one transfer syntax."""

    transfer_syntax_uid: str
    name: str
    compressed: bool
    available: bool
    plugins: tuple[str, ...]  # plugins whose dependencies are installed
    missing: tuple[str, ...]  # the others, each with what it lacks


def _status(ts: dicom_uid.UID) -> CodecStatus:
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        return CodecStatus(str(ts), ts.name, ts.is_compressed, False, (), ())
    missing = tuple(str(m) for m in decoder.missing_dependencies)  # e.g. "gdcm - requires gdcm>=3.0.10"
    return CodecStatus(
        str(ts),
        ts.name,
        ts.is_compressed,
        bool(decoder.is_available),
        tuple(decoder.available_plugins),
        missing,
    )


@cache
def codec_table() -> tuple[CodecStatus, ...]:
    """Decoding support for every transfer syntax pydicom knows (computed once per process)."""
    return tuple(_status(ts) for ts in dicom_uid.AllTransferSyntaxes)


@cache
def decodable_transfer_syntaxes() -> frozenset[str]:
    """UIDs of the transfer syntaxes whose pixel data can be decoded here."""
    return frozenset(c.transfer_syntax_uid for c in codec_table() if c.available)


def can_decode(transfer_syntax_uid: str | None) -> bool:
    """True when pixel data in this transfer syntax can be decoded (False for unknown/private ones)."""
    return transfer_syntax_uid is not None and transfer_syntax_uid in decodable_transfer_syntaxes()
