"""LoRA: low-rank adapters on a frozen Qwen3 / Qwen3-MoE, read and written in PEFT's format.

    lcfg = LoRAConfig(rank=16, alpha=32, dropout=0.05)                 # default targets: q/k/v/o projections
    adapters = init_adapters(cfg, lcfg, seed=0, mesh=mesh)             # {target: {"a", "b"}}, stacked over layers
    model(ids, lora=LoRA(adapters, lcfg.scale))                        # the forward with the adapters (model.LoRA)
    save_adapter(adapters, lcfg, cfg, "out/")      # adapter_config.json + adapter_model.safetensors (peft, vLLM)
    qwen3_jax.from_pretrained(base_dir, adapter="out/")                # the base with the adapter merged in

The adapters are laid out like the weights they adapt (see qwen3_jax.model, LoRA section); on disk each layer's
projection has PEFT's `base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight` ([r, in] and
[out, r], the module names of transformers' Qwen3 / Qwen3-MoE), so `peft.PeftModel.from_pretrained(<transformers
model>, dir)` and vLLM's `--lora-modules` load them. Only the attention projections are adapted: transformers keeps
Qwen3-MoE's experts as fused 3-D parameters (mlp.experts.gate_up_proj, mlp.experts.down_proj) and the router as a
bare parameter, not the Linear modules a PEFT adapter's target_modules name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from .config import Qwen3Config
from .model import LORA_TARGETS, LoRA
from .partition import LORA_RULES, place, spec_for

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DEFAULT_TARGETS = LORA_TARGETS
# names a user may reach for that no PEFT adapter of transformers' Qwen3-MoE can target as Linear modules
_NOT_MODULES = {
    "gate_proj": "the experts' gate", "up_proj": "the experts' up", "down_proj": "the experts' down",
    "gate_up_proj": "the experts' fused gate/up", "experts": "the experts", "gate": "the router",
    "router": "the router", "mlp": "the MoE block",
}
_NAME = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.self_attn\.([qkvo]_proj)\.lora_([AB])\.weight")

__all__ = ["LoRA", "LoRAConfig", "DEFAULT_TARGETS", "adapter_shapes", "init_adapters", "adapter_shardings",
           "save_adapter", "load_adapter", "check_adapter", "merged_attention", "merge_into_model", "parse_targets"]


class AdapterError(ValueError):
    """An adapter directory does not match the model or PEFT's LoRA format; the message names field, tensor, file."""


def parse_targets(targets) -> tuple[str, ...]:
    """A comma-separated string or a list of target names -> the tuple in LORA_TARGETS order; a clear error for names
    that are not attention projections."""
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else [str(t).strip() for t in targets]
    names = [t for t in names if t]
    if not names:
        raise ValueError(f"LoRA targets: none given (choose from {', '.join(LORA_TARGETS)})")
    for t in names:
        if t in _NOT_MODULES:
            raise ValueError(
                f"LoRA target {t!r}: transformers' Qwen3-MoE keeps {_NOT_MODULES[t]} weights as fused 3-D "
                "parameters (mlp.experts.gate_up_proj [E, 2F, D], mlp.experts.down_proj [E, D, F]; the router "
                "mlp.gate.weight), not the Linear modules a PEFT LoRA adapter targets, so no adapter that peft and "
                f"vLLM load can carry it; LoRA adapts the attention projections: {', '.join(LORA_TARGETS)}")
        if t not in LORA_TARGETS:
            raise ValueError(f"LoRA target {t!r}: choose from {', '.join(LORA_TARGETS)}")
    return tuple(t for t in LORA_TARGETS if t in names)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """rank r; alpha (default r: scale 1); dropout on the adapters' input while training; the adapted projections.
    scale = alpha / r (alpha / sqrt(r) with rslora, as PEFT's use_rslora)."""

    rank: int
    alpha: float | None = None
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    rslora: bool = False

    def __post_init__(self):
        if not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "targets", parse_targets(self.targets))

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def to_json(self) -> dict:
        return {"rank": int(self.rank), "alpha": self.lora_alpha, "dropout": float(self.dropout),
                "targets": list(self.targets), "rslora": bool(self.rslora)}

    @classmethod
    def from_json(cls, d: dict) -> "LoRAConfig":
        return cls(rank=int(d["rank"]), alpha=float(d["alpha"]), dropout=float(d["dropout"]),
                   targets=tuple(d["targets"]), rslora=bool(d.get("rslora", False)))

    def peft_config(self, base_model_name_or_path: str | None = None) -> dict:
        """adapter_config.json: PEFT's LoraConfig fields (peft and vLLM read it)."""
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
            "r": int(self.rank), "lora_dropout": float(self.dropout),
            "lora_alpha": int(self.lora_alpha) if self.lora_alpha.is_integer() else self.lora_alpha,
            "target_modules": list(self.targets), "bias": "none", "fan_in_fan_out": False, "use_rslora": self.rslora,
            "use_dora": False, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True, "inference_mode": True,
        }


def _peft_lora_config(d: dict, where: str) -> LoRAConfig:
    """LoRAConfig of an adapter_config.json dict; what the stacked adapters cannot hold is named."""
    if d.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{where}: peft_type {d.get('peft_type')!r}: only LoRA adapters are read")
    unsupported = {"use_dora": True, "fan_in_fan_out": True, "lora_bias": True}
    for key, bad in unsupported.items():
        if d.get(key) == bad:
            raise AdapterError(f"{where}: {key}: {bad} is not supported (plain LoRA only)")
    if d.get("bias", "none") != "none":
        raise AdapterError(f"{where}: bias {d['bias']!r} is not supported (bias: none)")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform", "layer_replication",
                "target_parameters", "trainable_token_indices"):
        if d.get(key):
            raise AdapterError(f"{where}: {key} {d[key]!r} is not supported (one rank and alpha for every "
                               "layer's attention projections, no full modules)")
    if "r" not in d:
        raise AdapterError(f"{where}: no 'r' (the LoRA rank)")
    try:
        return LoRAConfig(rank=int(d["r"]), alpha=float(d.get("lora_alpha", 8)),
                          dropout=float(d.get("lora_dropout") or 0), targets=LORA_TARGETS,
                          rslora=bool(d.get("use_rslora", False)))
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{where}: {e}") from None


# ============================================================================ shapes, init, sharding
def adapter_shapes(cfg: Qwen3Config, lcfg: LoRAConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """{target: {"a": shape, "b": shape}}: q/k/v a [L, r, D], b [L, N, hd, r]; o a [L, r, H, hd], b [L, D, r]."""
    L, r, d, hd = cfg.num_hidden_layers, lcfg.rank, cfg.hidden_size, cfg.head_dim
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads, "v_proj": cfg.num_key_value_heads}
    out = {}
    for t in lcfg.targets:
        if t == "o_proj":
            out[t] = {"a": (L, r, cfg.num_attention_heads, hd), "b": (L, d, r)}
        else:
            out[t] = {"a": (L, r, d), "b": (L, heads[t], hd, r)}
    return out


def adapter_shardings(cfg: Qwen3Config, lcfg: LoRAConfig, mesh, rules=None) -> dict:
    """{target: {"a": NamedSharding, "b": ...}} by qwen3_jax.partition.LORA_RULES (head axes over 'tensor', else
    replicated: rank-r matrices are small)."""
    from jax.sharding import NamedSharding


    return {t: {ab: NamedSharding(mesh, spec_for((t, ab), shape, mesh.shape, rules or LORA_RULES))
                for ab, shape in s.items()} for t, s in adapter_shapes(cfg, lcfg).items()}


def init_adapters(cfg: Qwen3Config, lcfg: LoRAConfig, seed: int = 0, mesh=None, dtype=jnp.float32) -> dict:
    """PEFT's initialisation: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform, a = sqrt 5), B = 0, so the
    adapted model starts as the base. Deterministic in the seed, and placed on `mesh` (every process computes the same
    values)."""
    shapes = adapter_shapes(cfg, lcfg)

    def init():
        key = jax.random.fold_in(jax.random.key(seed), 0x10AA)
        out = {}
        for i, (t, s) in enumerate(shapes.items()):
            fan_in = math.prod(s["a"][2:])
            bound = 1.0 / math.sqrt(fan_in)
            a = jax.random.uniform(jax.random.fold_in(key, i), s["a"], jnp.float32, -bound, bound)
            out[t] = {"a": a.astype(dtype), "b": jnp.zeros(s["b"], dtype)}
        return out

    shardings = None if mesh is None else adapter_shardings(cfg, lcfg, mesh)
    return jax.jit(init, out_shardings=shardings)()


# ============================================================================ merging
def merged_attention(name: str, w, ab, scale: float):
    """w + scale * B A in fp32, back in w's dtype: w [L, N, hd, D] (q/k/v) or [L, H, hd, D] (o_proj)."""
    f32 = jnp.float32
    a, b = ab["a"].astype(f32), ab["b"].astype(f32)
    delta = jnp.einsum("lrhk,ldr->lhkd", a, b) if name == "o_proj" else jnp.einsum("lnhr,lrd->lnhd", b, a)
    return (w.astype(f32) + jnp.asarray(scale, f32) * delta).astype(w.dtype)


def _merge_fn(name, scale, sharding):
    return jax.jit(lambda w, ab: merged_attention(name, w, ab, scale), out_shardings=sharding)


def merge_params(attn: dict, adapters: dict, lcfg: LoRAConfig) -> dict:
    """{q_proj, ...: merged weight} of the attention stacks `attn` (arrays, each kept on its sharding)."""
    out = {}
    for t in lcfg.targets:
        w = attn[t]
        out[t] = _merge_fn(t, lcfg.scale, getattr(w, "sharding", None))(w, adapters[t])
    return out


def merge_into_model(model, adapters: dict, lcfg: LoRAConfig):
    """Replace the model's adapted attention weights by base + scale * B A (new arrays; in place on the module)."""
    attn = model.layers.attn
    merged = merge_params({t: getattr(attn, t)[...] for t in lcfg.targets}, _placed(adapters, model.mesh), lcfg)
    for t, w in merged.items():
        getattr(attn, t).set_value(w)
    return model


def _placed(adapters, mesh):
    """Host (numpy) adapters replicated on `mesh` (each process holds the same values); device arrays as they are."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, adapters)
    from jax.sharding import NamedSharding, PartitionSpec as P


    return jax.tree.map(lambda x: x if isinstance(x, jax.Array) else place(np.asarray(x), NamedSharding(mesh, P())),
                        adapters)


# ============================================================================ PEFT files
def _peft_name(layer: int, target: str, ab: str) -> str:
    return f"base_model.model.model.layers.{layer}.self_attn.{target}.lora_{ab.upper()}.weight"


def _to_peft(target: str, ab: str, x: np.ndarray) -> np.ndarray:
    """One layer's adapter matrix in our layout -> PEFT's [r, in] (A) / [out, r] (B)."""
    if ab == "a":
        return np.ascontiguousarray(x.reshape(x.shape[0], -1))          # [r, D] / [r, H*hd]
    return np.ascontiguousarray(x.reshape(-1, x.shape[-1]))              # [N*hd, r] / [D, r]


def save_adapter(adapters: dict, lcfg: LoRAConfig, cfg: Qwen3Config, path, base_model_name_or_path=None) -> None:
    """Write adapter_config.json + adapter_model.safetensors (fp32). Every process of a multi-process run calls it
    (arrays spread over processes are gathered); process 0 writes."""
    from .checkpoint import host_value

    path = os.fspath(path)
    tensors = {}
    for t in lcfg.targets:
        for ab in ("a", "b"):
            x = host_value(adapters[t][ab], None).astype(np.float32)
            for i in range(cfg.num_hidden_layers):
                tensors[_peft_name(i, t, ab)] = _to_peft(t, ab, x[i])
    if jax.process_index() != 0:
        return
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
        json.dump(lcfg.peft_config(base_model_name_or_path), f, indent=2)


def check_adapter(path, cfg: Qwen3Config) -> tuple[LoRAConfig, dict]:
    """Validate a PEFT adapter directory against `cfg` from its config and the safetensors header (no tensor data
    read): (its LoRAConfig with the targets it carries, {name: (target, "a"|"b", layer)}). Raises AdapterError naming
    the field, tensor or file."""
    path = os.fspath(path)
    conf_file, weights = os.path.join(path, ADAPTER_CONFIG), os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isdir(path):
        raise AdapterError(f"{path}: not an adapter directory")
    if not os.path.isfile(conf_file):
        raise AdapterError(f"{path}: no {ADAPTER_CONFIG} (a PEFT LoRA adapter directory has it)")
    if not os.path.isfile(weights):
        other = " (adapter_model.bin is pickled: convert it to safetensors)" if os.path.isfile(
            os.path.join(path, "adapter_model.bin")) else ""
        raise AdapterError(f"{path}: no {ADAPTER_WEIGHTS}{other}")
    try:
        with open(conf_file) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"{conf_file}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise AdapterError(f"{conf_file}: expected a JSON object")
    lcfg = _peft_lora_config(d, conf_file)
    try:
        with safe_open(weights, framework="numpy") as f:
            shapes = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{weights}: cannot read safetensors file (truncated or damaged?): {e}") from None
    names, targets = {}, set()
    for n in sorted(shapes):
        m = _NAME.fullmatch(n)
        if m is None or int(m.group(1)) >= cfg.num_hidden_layers:
            raise AdapterError(f"{weights}: unexpected tensor {n!r} (a LoRA adapter of the attention projections has "
                               f"base_model.model.model.layers.<0..{cfg.num_hidden_layers - 1}>.self_attn."
                               "<q|k|v|o>_proj.lora_<A|B>.weight)")
        names[n] = (m.group(2), m.group(3).lower(), int(m.group(1)))
        targets.add(m.group(2))
    if not targets:
        raise AdapterError(f"{weights}: no LoRA tensors")
    lcfg = dataclasses.replace(lcfg, targets=tuple(t for t in LORA_TARGETS if t in targets))
    want = adapter_shapes(cfg, lcfg)
    for t in lcfg.targets:
        for ab in ("a", "b"):
            one = want[t][ab][1:]
            shape = (one[0], math.prod(one[1:])) if ab == "a" else (math.prod(one[:-1]), one[-1])
            for i in range(cfg.num_hidden_layers):
                n = _peft_name(i, t, ab)
                if n not in shapes:
                    raise AdapterError(f"{weights}: tensor {n!r} is missing (every layer's {t} needs lora_A and "
                                       "lora_B)")
                if shapes[n] != shape:
                    raise AdapterError(f"{weights}: tensor {n!r} has shape {shapes[n]}, the model (and r = "
                                       f"{lcfg.rank}) expects {shape}")
    return lcfg, names


def load_adapter(path, cfg: Qwen3Config) -> tuple[LoRAConfig, dict]:
    """(LoRAConfig, {target: {"a", "b"}} as fp32 numpy stacked over layers) of a PEFT adapter directory."""
    lcfg, names = check_adapter(path, cfg)
    shapes = adapter_shapes(cfg, lcfg)
    out = {t: {ab: np.zeros(s, np.float32) for ab, s in shapes[t].items()} for t in lcfg.targets}
    weights = os.path.join(os.fspath(path), ADAPTER_WEIGHTS)
    try:
        with safe_open(weights, framework="numpy") as f:
            for n, (t, ab, i) in names.items():
                out[t][ab][i] = f.get_tensor(n).astype(np.float32).reshape(shapes[t][ab][1:])
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{weights}: cannot read its tensors (truncated file?): {e}") from None
    return lcfg, out
