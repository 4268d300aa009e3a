"""The fastdiff version: one home, imported by the package and by every module that records it in a file."""

__version__ = "0.1.0"  # keep in step with pyproject.toml's [project] version
