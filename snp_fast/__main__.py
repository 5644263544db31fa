"""`python -m snp_fast ...` is the `snp-fast` command line (snp_fast.cli)."""
from .cli import main

raise SystemExit(main())
