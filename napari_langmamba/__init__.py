"""napari-langmamba: language-guided low-dose CT denoising (LangMamba / LEDA) for napari.

The package root imports nothing heavy: torch, transformers and Qt load only where used.
"""

import logging

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("napari-langmamba")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["__version__"]
