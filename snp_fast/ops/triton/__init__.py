"""Triton kernels (one op per file). Importing this package registers the "triton" backends."""
from . import gram, qk_scores, redundancy  # noqa: F401
