"""Spectra: weight spectra, effective ranks and MPO bond profiles of transformer LMs.

Importing the package is cheap: torch, transformers and polars load only when a
function that needs them runs.
"""

__version__ = "0.1.0"

from spectra.errors import SpectraInputError  # noqa: E402


def open_model(spec, device: str = "auto", dtype: str = "auto", offload: str = "auto"):
    """The one entry to a model: a dense one (spectra.io.model.Model) or a `spectra
    apply` output (compressors.opened.Compressed), resolved once, run on `device` in
    `dtype`, held resident or streamed from disk (`offload`)."""
    from pathlib import Path

    if (Path(str(spec)) / "manifest.json").is_file():
        from compressors.opened import open_out  # deferred: torch

        return open_out(spec, device, dtype, offload)
    from spectra.io.model import open_model as open_dense

    return open_dense(str(spec), device, dtype, offload)


def load_compressed(out, device: str = "cpu"):
    """The model written by `spectra apply` to OUT, with its compact modules."""
    from compressors import io  # the one bridge to the compressors; deferred: torch

    return io.load(out, device)[0]


__all__ = ["SpectraInputError", "__version__", "load_compressed", "open_model"]
