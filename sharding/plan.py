"""Per-device memory plan of a model on a mesh, from the real module's abstract shapes and the rules.

    qwen3-jax-plan --preset Qwen3-30B-A3B --mesh data=4,expert=8 --dtype bfloat16 --batch 256 --seq 4096

No devices and no allocation: shard sizes follow from the partition specs and the mesh's axis sizes.
Activations are an estimate of what this model materialises (attention works one query chunk at a time and
keeps only each row's log-sum-exp for the backward, see qwen3_jax.kernels.attention; the MoE buffers are the worst case
of dropless dispatch unless --capacity-factor is given).
"""

from __future__ import annotations

import argparse
import math
import sys

import jax.numpy as jnp
import numpy as np

from qwen3_jax.kernels.attention import default_chunk
from qwen3_jax.config import Qwen3Config
from qwen3_jax.params import param_count

from .ep import capacity
from .mesh import AXES
from .rules import ACTIVATION_RULES, BATCH, fit_spec, param_shapes, param_specs, shard_bytes

GiB = 2**30
DEVICES = {"TPU v5e": 16, "TPU v5p": 95, "H100": 80, "H200": 141}   # HBM, GiB
HEADROOM = 0.9  # XLA temporaries, fragmentation, runtime: plan to use at most 90% of HBM


def parse_mesh(text: str) -> dict[str, int]:
    sizes = dict.fromkeys(AXES, 1)
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in sizes or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--mesh {text!r}: expected e.g. data=4,expert=8 with axes {AXES} and sizes >= 1")
        sizes[name] = int(value)
    return sizes


def _split(dim: int, axes, mesh: dict[str, int]) -> int:
    """Per-device size of `dim` split over `axes` as fit_spec would (falls back when not divisible)."""
    spec = fit_spec((axes,), (dim,), mesh)[0]
    names = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return dim // math.prod(mesh[a] for a in names)


def plan(cfg: Qwen3Config, mesh: dict[str, int], dtype="bfloat16", batch=1, seq=1, *,
         capacity_factor: float | None = None, remat: str = "full") -> dict:
    """Bytes per device by item (see `format_plan`)."""
    dt = np.dtype(jnp.dtype(dtype)).itemsize
    shapes, specs = param_shapes(cfg), param_specs(cfg, mesh)
    params = {p: shard_bytes(shapes[p], np.float32, specs[p], mesh) // 4 for p in shapes}  # elements
    n_param = sum(params.values())
    master = 4 if dt != 4 else 0
    d, hd, L = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
    tp = mesh["tensor"]
    b_loc = _split(batch, BATCH, mesh)
    h_loc = _split(cfg.num_attention_heads, "tensor", mesh)
    kv_loc = _split(cfg.num_key_value_heads, "tensor", mesh)
    v_loc = _split(cfg.vocab_size, "tensor", mesh)
    shards = math.prod(mesh[a] for a in BATCH)
    n_loc = -(-batch * seq // shards)  # MoE token layout: padded, split over all batch axes

    chunk = min(default_chunk(seq), seq)
    attn = 4 * b_loc * h_loc * chunk * seq * 4                     # one query chunk: scores, probs, dP, dS (fp32)
    proj = 2 * b_loc * seq * (h_loc + 2 * kv_loc) * hd * dt + 2 * b_loc * seq * d * dt
    if cfg.is_moe:
        ep, k = mesh["expert"], cfg.num_experts_per_tok
        e_loc = cfg.num_experts // ep
        f_loc = _split(cfg.moe_intermediate_size, "tensor", mesh)
        rows = n_loc * k if ep == 1 else ep * capacity(n_loc, k, ep, e_loc, capacity_factor)
        mlp = 3 * rows * d * dt + 3 * rows * f_loc * dt + n_loc * cfg.num_experts * 4  # buffers, SwiGLU, router
    else:
        rows = 0
        mlp = 3 * b_loc * seq * _split(cfg.intermediate_size, "tensor", mesh) * dt
    layer = attn + proj + mlp
    if remat == "full":
        saved = L * b_loc * seq * d * dt           # each layer's input, recomputed in the backward pass
    else:
        saved = L * (proj + mlp)                     # attention keeps q, k, v, out (in proj), not its scores
    kv_spec = fit_spec(ACTIVATION_RULES["kv_cache"], (L, batch, seq, cfg.num_key_value_heads, hd), mesh)
    return {
        "params": n_param * dt, "grads": n_param * dt, "adam": n_param * (8 + master),
        "saved": saved, "layer": 2 * layer, "attn": attn, "moe": mlp if cfg.is_moe else 0,
        "logits": 2 * b_loc * seq * v_loc * 4,
        "kv": 2 * shard_bytes((L, batch, seq, cfg.num_key_value_heads, hd), dtype, kv_spec, mesh),
        "b_loc": b_loc, "n_loc": n_loc, "rows": rows, "tp": tp, "shapes": shapes, "specs": specs,
        "param_elems": params,
    }


def format_plan(name: str, cfg: Qwen3Config, mesh: dict[str, int], dtype: str, batch: int, seq: int,
                capacity_factor=None, remat="full") -> str:
    r = plan(cfg, mesh, dtype, batch, seq, capacity_factor=capacity_factor, remat=remat)
    counts = param_count(cfg)
    n_dev = math.prod(mesh.values())
    g = lambda b: f"{b / GiB:9.2f}"  # noqa: E731
    mesh_s = " ".join(f"{a}={mesh[a]}" for a in AXES)
    bf = dtype != "float32"
    train = r["params"] + r["grads"] + r["adam"] + r["saved"] + r["layer"] + r["logits"]
    serve = r["params"] + r["kv"]
    dispatch = "dropless (worst case)" if capacity_factor is None else f"capacity factor {capacity_factor}"
    lines = [
        f"{name}: {counts['total'] / 1e9:.2f}B parameters ({counts['active'] / 1e9:.2f}B active), {dtype}",
        f"mesh {mesh_s} = {n_dev} devices; batch {batch} x seq {seq} -> {r['b_loc']} sequences and "
        f"{r['n_loc']} MoE tokens per device; remat {remat}; MoE {dispatch}",
        "",
        f"{'per device':<52}{'GiB':>9}",
        f"{'  params (' + dtype + ')':<52}{g(r['params'])}",
        f"{'  grads (' + dtype + ')':<52}{g(r['grads'])}",
        f"{'  AdamW m, v (fp32)' + (' + fp32 master weights' if bf else ''):<52}{g(r['adam'])}",
        f"{'  activations: layer inputs kept for remat' if remat == 'full' else '  activations: all layers saved':<52}"
        f"{g(r['saved'])}",
        f"{'  activations: one layer fwd+bwd working set':<52}{g(r['layer'])}",
        f"{'    of which attention, one query chunk (fp32, x2)':<52}{g(2 * r['attn'])}",
    ]
    if cfg.is_moe:
        lines.append(f"{'    of which MoE dispatch + expert SwiGLU (x2)':<52}{g(2 * r['moe'])}")
    lines += [
        f"{'  logits + their gradient (fp32)':<52}{g(r['logits'])}",
        f"{'  = training total':<52}{g(train)}",
        f"{'  KV cache for decoding (batch ' + str(batch) + ' x ' + str(seq) + ')':<52}{g(r['kv'])}",
        f"{'  = serving total (params + KV cache)':<52}{g(serve)}",
        "",
        f"{'fits (<= ' + str(int(HEADROOM * 100)) + '% of HBM)':<22}{'training':>10}{'serving':>10}",
    ]
    for dev, hbm in DEVICES.items():
        ok = lambda b: "yes" if b <= HEADROOM * hbm * GiB else "no"  # noqa: E731
        lines.append(f"{'  ' + dev + f' {hbm}G':<22}{ok(train):>10}{ok(serve):>10}")
    lines += ["", f"{'parameter layout':<42}{'global shape':<24}{'spec':<42}{'MiB/device':>10}"]
    itemsize = np.dtype(jnp.dtype(dtype)).itemsize
    for path, shape in r["shapes"].items():
        spec = ", ".join("None" if s is None else str(s) for s in r["specs"][path])
        lines.append(f"  {'.'.join(path):<40}{str(list(shape)):<24}{spec:<42}"
                     f"{r['param_elems'][path] * itemsize / 2**20:>10.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="qwen3-jax-plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="Qwen3-30B-A3B", help=f"one of {', '.join(Qwen3Config.presets())}")
    ap.add_argument("--config", help="a config.json (instead of --preset)")
    ap.add_argument("--mesh", default="expert=8", help="axis sizes, e.g. data=4,expert=8 (fsdp, tensor too)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    ap.add_argument("--seq", type=int, default=4096, help="sequence length (training and KV cache)")
    ap.add_argument("--capacity-factor", type=float, default=None, help="MoE capacity factor (default dropless)")
    ap.add_argument("--remat", default="full", choices=["full", "none"])
    a = ap.parse_args(argv)
    try:
        cfg = Qwen3Config.from_pretrained(a.config) if a.config else Qwen3Config.preset(a.preset)
        mesh = parse_mesh(a.mesh)
        print(format_plan(a.config or a.preset, cfg, mesh, a.dtype, a.batch, a.seq, a.capacity_factor, a.remat))
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"qwen3-jax-plan: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
