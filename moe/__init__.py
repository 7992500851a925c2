"""moe: GLaM-style sparse mixture-of-experts pretraining in JAX.

Data flows config -> mesh -> data -> model -> step -> checkpoint -> eval; one concept per module:
config, sharding, tokenizer, corpus, data, layers, router, dispatch, moe_layer, model, optim, checkpoint,
train_lib, metrics, eval_lib, generate, lm_eval_adapter, scaling, launch, aot, bench.
"""
