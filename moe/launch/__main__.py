"""`python -m moe.launch {tpu,gpu} ... -- TRAIN_ARGS` (moe/launch/jobs.py has the CLI)."""

import sys

from moe.launch.jobs import main

sys.exit(main())
