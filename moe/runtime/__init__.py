"""What the program runs on: the device mesh and the logical -> mesh axis rules (sharding.py), processes
(multihost.py), accelerator peak FLOP/s (peak.py) and the host malloc policy (hostmem.py).

Owns: every mention of a physical mesh axis and of the machine. Must not know the model or the data.
"""
