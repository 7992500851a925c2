"""Training: the sharded state and the jitted steps (steps.py), optimizers (optim.py), checkpoints and the
resume policy (checkpoint.py), metrics files (metrics.py), the rollback policy (guards.py), fault-injection
hooks for tests (faults.py) and the loop that ties them together (loop.py; train.py is its CLI).

Owns: the train state and what happens to it between steps. Must not define the model (moe/model) or
the input (moe/data).
"""
