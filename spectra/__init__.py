"""Spectra: weight spectra, effective ranks and MPO bond profiles of transformer LMs.

Importing the package is cheap: torch, transformers and polars load only when a
function that needs them runs.
"""

__version__ = "0.1.0"

from spectra.errors import SpectraInputError  # noqa: E402


def load_compressed(out, device: str = "cpu"):
    """The model written by `spectra apply` to OUT, with its compact modules."""
    from compressors import io  # the one bridge to the compressors; deferred: torch

    return io.load(out, device)[0]


__all__ = ["SpectraInputError", "__version__", "load_compressed"]
