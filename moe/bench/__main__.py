"""`python -m moe.bench NAME [--json PATH] [--quick]` (moe/bench/suite.py has the CLI)."""

from moe.bench.suite import main

main(host_malloc=True)
