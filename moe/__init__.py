"""moe: GLaM-style sparse mixture-of-experts pretraining in JAX.

Data flows config -> mesh -> data -> model -> step -> checkpoint -> eval; one concept per module:
config, sharding, corpus, tfrecord_source, tokenizer, data, layers, router, dispatch, expert_parallel,
moe_layer, model, optim, train_lib, checkpoint, metrics, eval_lib, tasks, generate, lm_eval_adapter, sweep,
scaling, scaling_fit, scaling_plot, aot, launch, bench, hostmem.
"""
