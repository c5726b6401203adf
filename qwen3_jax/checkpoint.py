"""Hugging Face safetensors checkpoints in and out, streamed tensor by tensor.

Loading first checks every tensor's name and shape against the config from the safetensors headers, then
never holds more than one layer's local slice on the host besides the model itself: each stacked parameter
is allocated once (on its devices / shards) and filled layer by layer with a donated update, and each
process reads only the slices its own devices hold (`safe_open(...).get_slice`). Saving gathers one layer
at a time (across processes on a pod slice) and process 0 writes.
Both the hub's per-expert names (`mlp.experts.{j}.gate_proj.weight`) and transformers 5's fused names
(`mlp.experts.gate_up_proj` [E, 2F, D], `mlp.experts.down_proj` [E, D, F]) are read; the hub layout is
written. safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors.numpy import save_file

from .config import Qwen3Config
from .hostmem import release_host_memory
from .model import Qwen3ForCausalLM
from .params import param_shardings

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


class CheckpointError(ValueError):
    """A checkpoint does not match its config or is damaged; the message names tensor and file."""


# ============================================================================ name mapping
@dataclass(frozen=True)
class Slot:
    """One of our stacked parameters: its path in the module, and per stack index the HF source."""

    path: tuple[str, ...]
    shape: tuple[int, ...]
    hf_names: Callable[[int], list[str]]                 # stack index -> hub tensor names (one or E)
    to_hf: Callable[[np.ndarray], list[np.ndarray]]      # our slice -> hub tensors (`_read_block` inverts it)
    stacked: bool = True


def _slots(cfg: Qwen3Config) -> list[Slot]:
    d, h, kv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    L, V = cfg.num_hidden_layers, cfg.vocab_size
    moe_layers, dense_layers = cfg.moe_layers, cfg.dense_layers
    E, F, I = cfg.num_experts, cfg.moe_intermediate_size, cfg.intermediate_size
    T = lambda x: np.ascontiguousarray(x.T)               # noqa: E731
    lay = "model.layers.{}."
    slots = [
        Slot(("embed_tokens",), (V, d), lambda _: ["model.embed_tokens.weight"], lambda x: [x], False),
        Slot(("norm",), (d,), lambda _: ["model.norm.weight"], lambda x: [x], False),
    ]
    if not cfg.tie_word_embeddings:
        slots.append(Slot(("lm_head",), (d, V), lambda _: ["lm_head.weight"], lambda x: [T(x)], False))

    def attn(name, hf, shape, to_hf):
        slots.append(Slot(("layers", "attn", name), (L, *shape), lambda i: [(lay + hf).format(i)], lambda x: [to_hf(x)]))

    qkv_out = lambda n: (lambda x: np.ascontiguousarray(x.reshape(n * hd, d)))  # noqa: E731
    attn("q_proj", "self_attn.q_proj.weight", (h, hd, d), qkv_out(h))    # ours [H, hd, D] <- hub [H*hd, D]
    attn("k_proj", "self_attn.k_proj.weight", (kv, hd, d), qkv_out(kv))
    attn("v_proj", "self_attn.v_proj.weight", (kv, hd, d), qkv_out(kv))
    attn("o_proj", "self_attn.o_proj.weight", (h, hd, d), lambda x: T(x.reshape(h * hd, d)))  # <- hub [D, H*hd]
    attn("q_norm", "self_attn.q_norm.weight", (hd,), lambda x: x)
    attn("k_norm", "self_attn.k_norm.weight", (hd,), lambda x: x)
    attn("input_layernorm", "input_layernorm.weight", (d,), lambda x: x)
    attn("post_attention_layernorm", "post_attention_layernorm.weight", (d,), lambda x: x)

    if moe_layers:
        Lm = len(moe_layers)
        ml = lambda i: lay.format(moe_layers[i]) + "mlp."  # noqa: E731
        per_expert = lambda proj: (lambda i: [f"{ml(i)}experts.{j}.{proj}.weight" for j in range(E)])  # noqa: E731
        unstack_T = lambda x: [np.ascontiguousarray(x[j].T) for j in range(E)]  # noqa: E731
        slots += [
            Slot(("layers", "moe", "router"), (Lm, d, E), lambda i: [ml(i) + "gate.weight"], lambda x: [T(x)]),
            Slot(("layers", "moe", "gate_proj"), (Lm, E, d, F), per_expert("gate_proj"), unstack_T),
            Slot(("layers", "moe", "up_proj"), (Lm, E, d, F), per_expert("up_proj"), unstack_T),
            Slot(("layers", "moe", "down_proj"), (Lm, E, F, d), per_expert("down_proj"), unstack_T),
        ]
    if dense_layers:
        Ld = len(dense_layers)
        dl = lambda i: lay.format(dense_layers[i]) + "mlp."  # noqa: E731
        for proj, shape in (("gate_proj", (d, I)), ("up_proj", (d, I)), ("down_proj", (I, d))):
            slots.append(Slot(("layers", "mlp", proj), (Ld, *shape), functools.partial(lambda p, i: [f"{dl(i)}{p}.weight"], proj),
                              lambda x: [T(x)]))
    return slots


def _fused_name(slot: Slot, cfg: Qwen3Config, i: int) -> str | None:
    """transformers 5's fused expert tensor of a MoE slot (gate_up_proj [E, 2F, D], gate rows first;
    down_proj [E, D, F]), or None for other slots."""
    if slot.path[:2] != ("layers", "moe") or slot.path[2] == "router":
        return None
    base = f"model.layers.{cfg.moe_layers[i]}.mlp.experts."
    return base + ("down_proj" if slot.path[2] == "down_proj" else "gate_up_proj")


# ============================================================================ reading
class _Reader:
    """The safetensors files of a checkpoint directory: every header read up front (name -> file, shape), so
    missing / misshapen / unexpected tensors and truncated files are found before any data is read; then
    slices of tensors (`safe_open(...).get_slice`), each file opened once per request and closed after (its
    mapped pages leave our RSS)."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, INDEX_FILE)
        single = os.path.join(path, SINGLE_FILE)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            self.files = sorted(set(weight_map.values()))
        elif os.path.exists(single):
            self.files = [SINGLE_FILE]
        else:
            found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if not found:
                raise CheckpointError(f"{path}: no model.safetensors, no {INDEX_FILE} (only safetensors are read)")
            self.files = found
        self.where: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for fn in self.files:
            with self._open(fn) as f:
                for name in f.keys():
                    self.where[name] = fn
                    self.shapes[name] = tuple(f.get_slice(name).get_shape())
        self.used: set[str] = set()
        self.sources: dict = {}  # (slot path, stack index) -> ("hub" | "fused", names), set by check_checkpoint

    def _open(self, fn: str):
        full = os.path.join(self.path, fn)
        if not os.path.exists(full):
            raise CheckpointError(f"{full}: shard listed in the index is missing")
        try:
            return safe_open(full, framework="numpy")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{full}: cannot read safetensors file (truncated or damaged?): {e}") from None

    def has(self, name: str) -> bool:
        return name in self.where

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """The tensor exists with this (hub) shape; it counts as expected from now on."""
        if name not in self.where:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        if self.shapes[name] != tuple(shape):
            raise CheckpointError(
                f"{os.path.join(self.path, self.where[name])}: tensor {name!r} has shape {self.shapes[name]}, "
                f"the config expects {tuple(shape)}")
        self.used.add(name)

    def read(self, requests: list[tuple[str, tuple[slice, ...]]]) -> list[np.ndarray]:
        """The slices `[(name, index)]` of checked tensors, in order."""
        out: list = [None] * len(requests)
        for fn in dict.fromkeys(self.where[n] for n, _ in requests):
            with self._open(fn) as f:
                for k, (name, index) in enumerate(requests):
                    if self.where[name] != fn:
                        continue
                    try:
                        out[k] = f.get_slice(name)[index]
                    except (SafetensorError, OSError, ValueError) as e:
                        raise CheckpointError(
                            f"{os.path.join(self.path, fn)}: cannot read tensor {name!r} (truncated file?): {e}") from None
        return out

    def unexpected(self) -> list[str]:
        return sorted(n for n in self.where if n not in self.used and not _IGNORED.match(n))


def _hf_shapes(slot: Slot, cfg: Qwen3Config) -> list[tuple[int, ...]]:
    """Hub shapes of one stack index of `slot` (from the inverse conversion of a dummy slice)."""
    shape = slot.shape[1:] if slot.stacked else slot.shape
    return [t.shape for t in slot.to_hf(np.zeros(shape, np.int8))]


def _source(slot: Slot, cfg: Qwen3Config, reader: _Reader, i: int) -> tuple[str, list[str]]:
    """Check where stack index i of `slot` comes from: ("hub", names) or, for experts, transformers 5's
    ("fused", [name]); raises CheckpointError naming the missing / misshapen tensor."""
    names = slot.hf_names(i)
    if len(names) > 1 and not reader.has(names[0]):
        fused = _fused_name(slot, cfg, i)
        if fused is not None and reader.has(fused):
            E, F, D = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
            reader.check(fused, (E, D, F) if slot.path[2] == "down_proj" else (E, 2 * F, D))
            return "fused", [fused]
    for name, shape in zip(names, _hf_shapes(slot, cfg)):
        reader.check(name, shape)
    return "hub", names


def check_checkpoint(path, cfg: Qwen3Config) -> _Reader:
    """Validate a checkpoint directory against `cfg` from the safetensors headers alone (no tensor data is
    read): every tensor present with its shape, no unexpected tensor, no truncated file. Raises
    CheckpointError naming the tensor and file."""
    reader = _Reader(os.fspath(path))
    reader.sources = {(slot.path, i): _source(slot, cfg, reader, i)
                      for slot in _slots(cfg) for i in range(slot.shape[0] if slot.stacked else 1)}
    extra = reader.unexpected()
    if cfg.tie_word_embeddings:
        extra = [n for n in extra if n != "lm_head.weight"]  # tied: transformers ignores it too
    if extra:
        shown = ", ".join(f"{n!r} (in {reader.where[n]})" for n in extra[:5])
        raise CheckpointError(f"{reader.path}: {len(extra)} unexpected tensor(s) for this config: {shown}")
    return reader


def _read_block(slot: Slot, cfg: Qwen3Config, reader: _Reader, i: int, idx: tuple[slice, ...]) -> np.ndarray:
    """The block `idx` (slices of our layout, without the layer axis) of stack index i of `slot`, reading only
    the hub slices it needs."""
    kind, names = reader.sources[(slot.path, i)]
    name = slot.path[-1]
    hd = cfg.head_dim
    if slot.path[:2] == ("layers", "moe") and name != "router":      # experts: [E, D, F] / [E, F, D]
        se, s1, s2 = idx
        if kind == "fused":                                          # [E, 2F, D] gate|up, [E, D, F] down
            if name == "down_proj":
                (w,) = reader.read([(names[0], (se, s2, s1))])
            else:
                off = 0 if name == "gate_proj" else cfg.moe_intermediate_size
                (w,) = reader.read([(names[0], (se, slice(s2.start + off, s2.stop + off), s1))])
            return np.ascontiguousarray(w.transpose(0, 2, 1))
        ws = reader.read([(names[j], (s2, s1)) for j in range(se.start, se.stop)])  # hub [F, D] / [D, F] each
        return np.ascontiguousarray(np.stack([w.T for w in ws]))
    if name in ("q_proj", "k_proj", "v_proj"):                        # ours [N, hd, D] <- hub [N*hd, D]
        sn, sh, sd = idx
        (w,) = reader.read([(names[0], (slice(sn.start * hd, sn.stop * hd), sd))])
        return np.ascontiguousarray(w.reshape(-1, hd, w.shape[1])[:, sh, :])
    if name == "o_proj":                                              # ours [H, hd, D] <- hub [D, H*hd]
        sn, sh, sd = idx
        (w,) = reader.read([(names[0], (sd, slice(sn.start * hd, sn.stop * hd)))])
        return np.ascontiguousarray(w.T.reshape(-1, hd, w.shape[0])[:, sh, :])
    if len(idx) == 2 and name != "embed_tokens":                      # lm_head, router, dense MLP: transposed
        (w,) = reader.read([(names[0], (idx[1], idx[0]))])
        return np.ascontiguousarray(w.T)
    (w,) = reader.read([(names[0], idx)])                             # embeddings and norms: as stored
    return w


def _layer_sharding(sharding):
    """The sharding of one layer of a stacked parameter (its layer axis is never split by the rules)."""
    if sharding is None or not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec)
    if spec and spec[0] is not None:  # custom rules that split the layer axis: one layer replicated
        return NamedSharding(sharding.mesh, P())
    return NamedSharding(sharding.mesh, P(*spec[1:]))


def _local_array(read, shape, dtype, sharding):
    """A (global) array of `shape` on `sharding` from this process's blocks only: `read(idx)` is called once
    per distinct block that a local device holds."""
    full = tuple(slice(0, n) for n in shape)
    if sharding is None:
        return jnp.asarray(read(full).astype(dtype, copy=False))
    blocks, arrays = {}, []
    for device, idx in sharding.addressable_devices_indices_map(tuple(shape)).items():
        idx = tuple(slice(*s.indices(n)[:2]) for s, n in zip(idx, shape)) if idx else full
        key = tuple((s.start, s.stop) for s in idx)
        if key not in blocks:
            blocks[key] = read(idx).astype(dtype, copy=False)
        arrays.append(jax.device_put(blocks[key], device))
    return jax.make_array_from_single_device_arrays(tuple(shape), sharding, arrays)


@functools.partial(jax.jit, donate_argnums=0)
def _set_index(buf, val, i):
    return jax.lax.dynamic_update_index_in_dim(buf, val.astype(buf.dtype), i, 0)


def _placement(shape, dtype, sharding):
    """Allocate zeros directly on their devices (sharded when a sharding is given)."""
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


def load_params(path: str, cfg: Qwen3Config, param_dtype, shardings: dict | None = None) -> dict:
    """Read a checkpoint into {slot path: array}. `shardings` maps slot path -> jax Sharding (optional).

    The whole checkpoint is validated from its headers first. Then each process reads, per layer, only the
    slices of each tensor that its own devices hold (a device's experts, its columns of a projection, ...),
    so host memory stays at one layer's local slice besides the model."""
    reader = check_checkpoint(path, cfg)
    out = {}
    for slot in _slots(cfg):
        sharding = (shardings or {}).get(slot.path)
        if not slot.stacked:
            out[slot.path] = _local_array(lambda idx: _read_block(slot, cfg, reader, 0, idx), slot.shape,
                                          param_dtype, sharding)
            continue
        layer_sharding = _layer_sharding(sharding)
        buf = _placement(slot.shape, param_dtype, sharding)
        for i in range(slot.shape[0]):
            val = _local_array(lambda idx: _read_block(slot, cfg, reader, i, idx), slot.shape[1:], param_dtype,
                               layer_sharding)
            # wait for each write: with async dispatch the loop would run ahead, keeping many layers' host
            # slices alive at once (host memory would then depend on how fast the device drains the queue)
            buf = jax.block_until_ready(_set_index(buf, val, i))
            del val
            release_host_memory()  # per layer: freed slices go back to the OS before the next read
        out[slot.path] = buf
    return out


def from_pretrained(path, dtype="float32", param_dtype=None, *, mesh=None, rules=None, adapter=None,
                    **model_kw) -> Qwen3ForCausalLM:
    """Load a Hugging Face Qwen3 / Qwen3-MoE checkpoint directory (config.json + safetensors).

    adapter: a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors, qwen3_jax.lora), merged
    into the weights it adapts (W + alpha / r * B A, computed in fp32): the model then runs as fast as the base."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a checkpoint directory")
    cfg = Qwen3Config.from_pretrained(path)
    lora = None
    if adapter is not None:
        from .lora import load_adapter

        lora = load_adapter(adapter, cfg)  # checked against the config before the weights are read
    dtype = jnp.dtype(dtype)
    param_dtype = jnp.dtype(param_dtype) if param_dtype is not None else dtype
    abstract = nnx.eval_shape(lambda: Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, **model_kw))
    shardings = None
    if mesh is not None:

        shardings = param_shardings(cfg, mesh, rules)
    params = load_params(path, cfg, param_dtype, shardings)
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    for p, arr in params.items():
        flat[p].set_value(arr) if hasattr(flat[p], "set_value") else setattr(flat[p], "value", arr)
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    if mesh is not None:
        model.mesh = mesh
    if lora is not None:
        from .lora import merge_into_model

        merge_into_model(model, lora[1], lora[0])
    return model


# ============================================================================ writing
def _parse_size(s) -> int:
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(s), re.I)
    if not m:
        raise ValueError(f"max_shard_size {s!r}: expected bytes or e.g. '5GB', '500MB'")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * mult)


def host_value(x, i: int | None) -> np.ndarray:
    """Layer i of a stacked parameter (or the whole of an unstacked one, i None) as numpy on this host. An
    array spread over several processes is gathered one layer at a time, so no host ever holds the model."""
    part = x if i is None else x[i]
    if not isinstance(part, jax.Array) or part.is_fully_addressable:
        return np.asarray(part)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(part, tiled=True))


def save_pretrained(model: Qwen3ForCausalLM, path, max_shard_size="5GB") -> None:
    """Write config.json and hub-layout safetensors (per-expert names; shards + index when large).

    With several processes (a pod slice) every process must call it: each layer is gathered from the hosts
    that hold it, and process 0 writes the files."""
    path = os.fspath(path)
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(path, exist_ok=True)
    cfg = model.config
    state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    dtype = np.dtype(state[("embed_tokens",)][...].dtype)
    # plan rows (hf name, slot, stack index, position in the slot's hub list, nbytes), layer by layer
    plan = []
    for slot in _slots(cfg):
        shapes = _hf_shapes(slot, cfg)
        for i in range(slot.shape[0] if slot.stacked else 1):
            for j, (name, shp) in enumerate(zip(slot.hf_names(i), shapes)):
                plan.append((name, slot, i, j, int(np.prod(shp)) * dtype.itemsize))
    plan.sort(key=lambda r: _layer_of(r[0]))  # stable: within a layer, slot order
    limit = _parse_size(max_shard_size)
    shards, cur, size = [], [], 0
    for row in plan:
        if cur and size + row[4] > limit:
            shards.append(cur)
            cur, size = [], 0
        cur.append(row)
        size += row[4]
    shards.append(cur)
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    weight_map = {}
    cache: dict = {}  # hub tensors of the current layer's slices, converted once each
    for fn, rows in zip(names, shards):
        tensors = {}
        for name, slot, i, j, _ in rows:
            key = (slot.path, i)
            if key not in cache:
                if cache and _layer_of(name) != _layer_of(next(iter(cache.values()))[0][0]):
                    cache.clear()
                value = host_value(state[slot.path][...], i if slot.stacked else None)
                hub = slot.to_hf(value) if writer else [None] * len(slot.hf_names(i))
                cache[key] = [(nm, t) for nm, t in zip(slot.hf_names(i), hub)]
            tensors[name] = cache[key][j][1]
            weight_map[name] = fn
        if writer:
            save_file(tensors, os.path.join(path, fn), metadata={"format": "pt"})
            _readable(os.path.join(path, fn))
        del tensors
    cache.clear()
    if not writer:
        return
    if n > 1:
        total = sum(r[4] for r in plan)
        with open(os.path.join(path, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    torch_dtype = {"bfloat16": "bfloat16", "float32": "float32", "float16": "float16"}.get(dtype.name, dtype.name)
    cfg.replace(torch_dtype=torch_dtype).save_pretrained(path)


def _readable(path: str):
    """The mode an ordinary file gets (0644 under umask 022): safetensors writes its files 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _layer_of(name: str) -> tuple[int, int]:
    """Sort key: embeddings, then layers in order, then the final norm and lm_head (hub shard layout)."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if m:
        return (1, int(m.group(1)))
    return (0, 0) if name == "model.embed_tokens.weight" else (2, 0)
