"""The MoE FFN as a pipeline of pure functions: route (router.py) -> dispatch (dispatch.py, or
expert_parallel.py under a mesh with an `expert` axis) -> experts -> combine, composed in layer.py.

Owns: routing, capacity arithmetic, token movement and the expert weights. Auxiliary losses and metrics are
returned, never stored. Must not know about the decoder around it beyond `ModelConfig`.
"""
