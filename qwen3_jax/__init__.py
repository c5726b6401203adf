"""qwen3-jax: Qwen3 / Qwen3-MoE in JAX + Flax NNX, with Hugging Face checkpoint parity."""

from .config import PRESETS, Qwen3Config
from .model import CausalLMOutput, Qwen3ForCausalLM
from .checkpoint import CheckpointError, from_pretrained, save_pretrained
from .params import param_count
from .runtime import Runtime

__all__ = [
    "PRESETS",
    "Qwen3Config",
    "Qwen3ForCausalLM",
    "CausalLMOutput",
    "CheckpointError",
    "from_pretrained",
    "save_pretrained",
    "param_count",
    "Runtime",
]
__version__ = "0.1.0"
