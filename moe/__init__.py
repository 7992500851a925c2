"""moe: GLaM-style sparse mixture-of-experts pretraining in JAX.

Data flows config -> data -> model -> train (steps, checkpoints, loop) -> eval; docs/design.md has the
architecture. Subpackages, one concept each:
    config.py          the one config and all its rules
    model/             the decoder, its layers, attention, matmul and generation; model/experts/ the MoE FFN
    runtime/           mesh and sharding rules, processes, accelerator peaks, host memory
    data/              corpora, tokenizer, grain pipelines
    train/             state and steps, optimizers, checkpoints, metrics, rollback guard, the loop
    eval/              LM metrics, scoring, JSONL tasks (lm_eval_adapter.py registers `moe` with lm-eval)
    scaling/ launch/ bench/    off the training path: sweeps and fits, AOT and launchers, benchmarks
"""
