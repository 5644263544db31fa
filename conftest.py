"""Repository-root conftest: being here, it puts the repository root on sys.path under plain `pytest` too
(`python -m pytest` does that already), so the tests can import the research harnesses (`research.sweep`),
which live beside the package and are not installed."""
