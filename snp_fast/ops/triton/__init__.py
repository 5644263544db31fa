"""Triton kernels (one op per file). Importing this package registers the "triton" backends."""
from . import gram, redundancy  # noqa: F401
