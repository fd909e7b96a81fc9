"""cohort: distributed batch cohort processing for medical-imaging research.

Importing the package has no side effects: no logging configuration, no
directories created, no network access.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cohort")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
