"""Spectra: weight spectra, effective ranks and MPO bond profiles of transformer LMs.

Importing the package is cheap: torch, transformers and polars load only when a
function that needs them runs.
"""

__version__ = "0.1.0"

from spectra.errors import SpectraInputError  # noqa: E402

__all__ = ["SpectraInputError", "__version__"]
