"""Hugging Face safetensors checkpoints in and out, streamed tensor by tensor.

Loading first checks every tensor's name and shape against the config from the safetensors headers, then
never holds more than one layer's local slice on the host besides the model itself: each stacked parameter
is allocated once (on its devices / shards) and filled layer by layer with a donated update, and each
process reads only the slices its own devices hold (`safe_open(...).get_slice`). Saving gathers one layer
at a time (across processes on a pod slice) and process 0 writes.
Every tensor's name, shape and transform come from the weight table (qwen3_jax.weights). Both the hub's per-expert
names (`mlp.experts.{j}.gate_proj.weight`) and transformers 5's fused names (`mlp.experts.gate_up_proj` [E, 2F, D],
`mlp.experts.down_proj` [E, D, F]) are read; the hub layout is written. safetensors only: nothing is ever
unpickled.
"""

from __future__ import annotations

import functools
import json
import os
import re

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
from .weights import Fused, Weight, weights

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


class CheckpointError(ValueError):
    """A checkpoint does not match its config or is damaged; the message names tensor and file."""


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
        self.sources: dict = {}  # (parameter path, stack index) -> its Fused source, or None: the hub names

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


def _source(w: Weight, reader: _Reader, i: int) -> Fused | None:
    """Check where stack index i of `w` comes from: its hub tensors (None) or, for experts, transformers 5's fused
    tensor; raises CheckpointError naming the missing / misshapen tensor."""
    names = w.hf_names(i)
    if len(names) > 1 and not reader.has(names[0]) and w.fused is not None:
        fused = w.fused(i)
        if reader.has(fused.name):
            reader.check(fused.name, fused.shape)
            return fused
    for name, shape in zip(names, w.hub_shapes()):
        reader.check(name, shape)
    return None


def check_checkpoint(path, cfg: Qwen3Config) -> _Reader:
    """Validate a checkpoint directory against `cfg` from the safetensors headers alone (no tensor data is
    read): every tensor present with its shape, no unexpected tensor, no truncated file. Raises
    CheckpointError naming the tensor and file."""
    reader = _Reader(os.fspath(path))
    reader.sources = {(w.path, i): _source(w, reader, i) for w in weights(cfg) for i in range(w.count)}
    extra = reader.unexpected()
    if cfg.tie_word_embeddings:
        extra = [n for n in extra if n != "lm_head.weight"]  # tied: transformers ignores it too
    if extra:
        shown = ", ".join(f"{n!r} (in {reader.where[n]})" for n in extra[:5])
        raise CheckpointError(f"{reader.path}: {len(extra)} unexpected tensor(s) for this config: {shown}")
    return reader


def _read_block(w: Weight, reader: _Reader, i: int, idx: tuple[slice, ...]) -> np.ndarray:
    """The block `idx` (slices of our layout, without the layer axis) of stack index i of `w`, reading only the
    hub slices it needs."""
    fused = reader.sources[(w.path, i)]
    names = [fused.name] if fused is not None else w.hf_names(i)
    return w.read(idx, lambda requests: reader.read([(names[k], index) for k, index in requests]), fused)


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
    """Read a checkpoint into {parameter path: array}. `shardings` maps parameter path -> jax Sharding (optional).

    The whole checkpoint is validated from its headers first. Then each process reads, per layer, only the
    slices of each tensor that its own devices hold (a device's experts, its columns of a projection, ...),
    so host memory stays at one layer's local slice besides the model."""
    reader = check_checkpoint(path, cfg)
    out = {}
    for w in weights(cfg):
        sharding = (shardings or {}).get(w.path)
        if not w.stacked:
            out[w.path] = _local_array(lambda idx: _read_block(w, reader, 0, idx), w.shape, param_dtype, sharding)
            continue
        layer_sharding = _layer_sharding(sharding)
        buf = _placement(w.shape, param_dtype, sharding)
        for i in range(w.count):
            val = _local_array(lambda idx: _read_block(w, reader, i, idx), w.block_shape, param_dtype, layer_sharding)
            # wait for each write: with async dispatch the loop would run ahead, keeping many layers' host
            # slices alive at once (host memory would then depend on how fast the device drains the queue)
            buf = jax.block_until_ready(_set_index(buf, val, i))
            del val
            release_host_memory()  # per layer: freed slices go back to the OS before the next read
        out[w.path] = buf
    return out


def from_pretrained(path, dtype="float32", param_dtype=None, *, mesh=None, rules=None, adapter=None,
                    **model_kw) -> Qwen3ForCausalLM:
    """Load a Hugging Face Qwen3 / Qwen3-MoE checkpoint directory (config.json + safetensors).

    mesh: place every tensor straight into its shards on this mesh, by `rules`: None (training placement,
    qwen3_jax.partition.PARAM_RULES), a logical table such as SERVE_PARAM_RULES ({logical axis: mesh axes}), or a
    regex table ((path pattern, spec), ...); see qwen3_jax.params.param_specs.
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
    # plan rows (hf name, weight, stack index, position in its hub list, nbytes), layer by layer
    plan = []
    for w in weights(cfg):
        shapes = w.hub_shapes()
        for i in range(w.count):
            for j, (name, shp) in enumerate(zip(w.hf_names(i), shapes)):
                plan.append((name, w, i, j, int(np.prod(shp)) * dtype.itemsize))
    plan.sort(key=lambda r: _layer_of(r[0]))  # stable: within a layer, table order
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
        for name, w, i, j, _ in rows:
            key = (w.path, i)
            if key not in cache:
                if cache and _layer_of(name) != _layer_of(next(iter(cache.values()))[0][0]):
                    cache.clear()
                value = host_value(state[w.path][...], i if w.stacked else None)
                hub = w.to_hf(value) if writer else [None] * len(w.hf_names(i))
                cache[key] = [(nm, t) for nm, t in zip(w.hf_names(i), hub)]
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
