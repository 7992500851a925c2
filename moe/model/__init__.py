"""The decoder and its dense parts: layers (params with logical axes, RMSNorm, RoPE, gated FFN), attention,
the matmul primitive `mm`, the scanned decoder with its loss and analytic counts, and KV-cached generation.

Owns: the function the model computes. Must not read data, touch checkpoints or name a mesh axis (only
logical axis names; moe/runtime/sharding.py maps them). The MoE FFN is the subpackage `experts`.
"""
