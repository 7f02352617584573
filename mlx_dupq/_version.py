"""The package version (a leaf module: packs record it in their manifest)."""

__version__ = "0.1.0"
