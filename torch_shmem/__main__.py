"""``python -m torch_shmem``: the ``torch-shmem`` command line (see torch_shmem.cli)."""

import sys

from .cli import main

sys.exit(main())
