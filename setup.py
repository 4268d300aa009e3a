"""Build of the native extension fastdiff._C (issue 3). Metadata lives in pyproject.toml.

PLACEHOLDER — the extension build is being written; until then this installs the pure-Python package.
"""

from setuptools import setup

setup()
