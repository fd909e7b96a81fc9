"""Fixtures of the index tests."""

from __future__ import annotations

from pathlib import Path

import pydicom.data
import pytest

from tests.index.files import PYDICOM_DATA


@pytest.fixture(scope="session")
def pydicom_corpus() -> Path:
    """The folder holding every local file ``get_testdata_files()`` / ``get_charset_files()`` return."""
    files = pydicom.data.get_testdata_files() + pydicom.data.get_charset_files()
    assert len(files) > 150 and all(Path(f).is_relative_to(PYDICOM_DATA) for f in files)
    return PYDICOM_DATA
