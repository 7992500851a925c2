"""The benchmark suite behind the README performance table, off the training path (suite.py,
`python -m moe.bench NAME`). It measures the real modules and asserts nothing.
"""
