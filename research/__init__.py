"""Research harnesses for snp_fast: not part of the installed package.

Run them from the repository root, e.g. ``python -m research.sweep`` (the timm coverage sweep, COVERAGE.md).
"""
