"""Hugging Face interop: export our checkpoints as Qwen3-MoE / Qwen2-MoE / Mixtral (or Qwen3 / Llama for dense
models) folders that transformers loads with nothing else (`python -m moe.hf export`)."""
