"""`python -m moe.scaling {run,emit,collect,fit,plot} SWEEP.yaml ...` (moe/scaling/runner.py has the CLI)."""

import sys

from moe.scaling.runner import main

sys.exit(main())
