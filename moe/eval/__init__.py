"""Evaluation of checkpoints: loading a run, LM loss / perplexity / bits per byte and pair scoring (lm.py),
the JSONL task format and its scoring (tasks.py). The lm-eval harness model is moe/lm_eval_adapter.py (at
the top level: `import moe.lm_eval_adapter` is what registers it with lm-eval).

Owns: the numbers eval.py and the in-training eval report. Must not train or write into checkpoints.
"""
