"""Fine-tuning (installed as qwen3_jax.train)."""
