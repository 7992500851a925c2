"""Scaling-law sweeps, off the training path: sweep files (sweep.py), the runner / collector / CLI
(runner.py, `python -m moe.scaling`), the fits (fit.py) and plots (plot.py).

Each sweep point is an ordinary train.py run with its own workdir; nothing here reaches into a run.
"""
