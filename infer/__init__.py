"""Inference (installed as qwen3_jax.infer)."""
