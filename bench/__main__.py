"""Entry point for ``python -m bench``."""

import sys

from .bench_io import main

sys.exit(main())
