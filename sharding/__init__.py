"""Device mesh, partition rules and expert parallelism (installed as qwen3_jax.sharding)."""
