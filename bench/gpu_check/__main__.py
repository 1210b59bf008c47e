"""``python -m bench.gpu_check``: what bench/gpu_check.sh runs (bench.gpu_check.orchestrate)."""

import sys

from .orchestrate import main

sys.exit(main())
