"""python -m moe.hf export --workdir W [--step N] --out DIR [--arch auto|...] [--dtype bfloat16|float32]"""

import sys

from moe.hf.cli import main

sys.exit(main())
