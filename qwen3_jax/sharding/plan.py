"""Per-device memory plan of a model on a mesh, from the real module's abstract shapes and the rules.

    qwen3-jax-plan --preset Qwen3-30B-A3B --mesh fsdp=32,expert=8 --batch-size 256 --seq-len 4096    # train step
    qwen3-jax-plan --preset Qwen3-30B-A3B --mesh expert=8 --program decode --batch-size 64 --seq-len 4096  # decode

No devices and no allocation: shard sizes follow from the partition specs and the mesh's axis sizes. It models
the programs `qwen3-jax-compile` compiles (and qwen3-jax-train / the engine run):
- train: master weights, gradients, AdamW moments and the optimizer's update temporaries in --param-dtype (fp32),
  sharded by the training rules;
  each layer's weights gathered in the compute dtype for its forward and backward; with remat full (the trainer's
  default) each layer's input kept for the backward; one layer's working set (splash / flash attention keeps
  no score matrix, only per-row statistics; the MoE dispatch buffers: the ragged dispatch's receive buffer of
  --ep-buffer-factor x the routed rows, or padded per-pair buffers); the cross-entropy over one --ce-chunk of
  positions at a time (never the full [B, T, V] logits);
- train with --lora-rank: the frozen base in --param-dtype (default bfloat16) without gradients or moments, and
  the float32 adapters (qwen3_jax.lora) with their gradients, AdamW moments and update; the activations as above;
- decode: the weights in the compute dtype, sharded by the serving rules (no per-token gathers), the KV cache,
  one token's activations and its logits.
`qwen3-jax-compile` prints this estimate beside the compiled memory_analysis figure.
"""

from __future__ import annotations

import math
import sys

import jax.numpy as jnp
import numpy as np

from qwen3_jax.config import Qwen3Config
from qwen3_jax.moe import capacity, receive_rows
from qwen3_jax.params import param_count, param_shapes, param_specs
from qwen3_jax.partition import (ACTIVATION_RULES, BATCH, LORA_RULES, SERVE_PARAM_RULES, fit_spec, shard_bytes,
                                 spec_for)

from .mesh import AXES, parse_mesh

GiB = 2**30
DEVICES = {"TPU v5e": 16, "TPU v6e": 32, "TPU v5p": 95, "H100": 80, "H200": 141}   # HBM, GiB
HEADROOM = 0.9  # XLA fragmentation, runtime: plan to use at most 90% of HBM
PROGRAMS = ("train", "decode")


def _split(dim: int, axes, mesh: dict[str, int]) -> int:
    """Per-device size of `dim` split over `axes` as fit_spec would (falls back when not divisible)."""
    spec = fit_spec((axes,), (dim,), mesh)[0]
    names = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return dim // math.prod(mesh[a] for a in names)


def _layer_compute_elems(cfg: Qwen3Config, mesh: dict[str, int]) -> int:
    """Elements of one decoder layer's weights as its compute reads them: FSDP shards gathered, experts split over
    'expert' and widths over 'tensor' (the largest layer: a MoE layer when there is one)."""
    d, hd, tp = cfg.hidden_size, cfg.head_dim, mesh["tensor"]
    attn = d * hd * (_split(cfg.num_attention_heads, "tensor", mesh) * 2 + _split(cfg.num_key_value_heads, "tensor",
                                                                                 mesh) * 2)
    if cfg.is_moe:
        e_loc = cfg.num_experts // mesh["expert"]
        ffn = 3 * e_loc * d * _split(cfg.moe_intermediate_size, "tensor", mesh) + d * cfg.num_experts
    else:
        ffn = 3 * d * (cfg.intermediate_size // tp)
    return attn + ffn


def lora_elems(cfg: Qwen3Config, mesh: dict[str, int], lora_rank: int, lora_targets=None) -> int:
    """Elements of the LoRA adapters per device (qwen3_jax.lora's shapes, qwen3_jax.partition.LORA_RULES)."""
    from qwen3_jax.lora import DEFAULT_TARGETS, LoRAConfig, adapter_shapes


    lcfg = LoRAConfig(rank=lora_rank, targets=lora_targets or DEFAULT_TARGETS)
    return sum(shard_bytes(shape, np.float32, spec_for((t, ab), shape, mesh, LORA_RULES), mesh) // 4
               for t, s in adapter_shapes(cfg, lcfg).items() for ab, shape in s.items())


def plan(cfg: Qwen3Config, mesh: dict[str, int], dtype="bfloat16", batch=1, seq=1, *, program: str = "train",
         param_dtype=None, remat: str = "full", buffer_factor: float | None = 1.25,
         capacity_factor: float | None = None, dispatch: str = "ragged", ce_chunk: int = 512,
         lora_rank: int | None = None, lora_targets=None) -> dict:
    """Bytes per device by item, and their "total" (see the module docstring).

    dispatch: the EP dispatch the program uses ("ragged": a receive buffer of buffer_factor x the routed rows;
    "padded": per-pair buffers of capacity_factor, None = the worst case).
    param_dtype: the master weights (default float32), or with lora_rank the frozen base (default bfloat16).
    """
    if program not in PROGRAMS:
        raise ValueError(f"program {program!r}: choose from {', '.join(PROGRAMS)}")
    if param_dtype is None:
        param_dtype = "bfloat16" if lora_rank and program == "train" else "float32"
    mesh = {a: int(mesh.get(a, 1)) for a in AXES}
    dt = np.dtype(jnp.dtype(dtype)).itemsize
    pt = np.dtype(jnp.dtype(param_dtype)).itemsize if program == "train" else dt
    rules = None if program == "train" else SERVE_PARAM_RULES
    shapes, specs = param_shapes(cfg), param_specs(cfg, mesh, rules)
    elems = {p: shard_bytes(shapes[p], np.float32, specs[p], mesh) // 4 for p in shapes}
    n_param = sum(elems.values())
    d, hd, L = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
    b_loc = _split(batch, BATCH, mesh)
    h_loc = _split(cfg.num_attention_heads, "tensor", mesh)
    kv_loc = _split(cfg.num_key_value_heads, "tensor", mesh)
    v_loc = _split(cfg.vocab_size, "tensor", mesh)
    shards = math.prod(mesh[a] for a in BATCH)
    t = seq if program == "train" else 1                       # tokens per row in this step
    n_loc = -(-batch * t // shards)                            # MoE token layout: padded, split over batch axes
    ep, k = mesh["expert"], cfg.num_experts_per_tok
    rows = 0
    if cfg.is_moe:
        e_loc = cfg.num_experts // ep
        if ep == 1:
            rows = n_loc * k
        elif dispatch == "ragged":
            rows = receive_rows(n_loc, k, ep, e_loc, buffer_factor if program == "train" else None)
        else:
            rows = ep * capacity(n_loc, k, ep, e_loc, capacity_factor if program == "train" else None)
        f_loc = _split(cfg.moe_intermediate_size, "tensor", mesh)
        # send + receive buffers and the combined output [rows, D]; gate, up, SwiGLU [rows, F]; router logits fp32
        moe = 3 * rows * d * dt + 3 * rows * f_loc * dt + n_loc * cfg.num_experts * 4
    else:
        moe = 3 * b_loc * t * _split(cfg.intermediate_size, "tensor", mesh) * dt
    qkvo = b_loc * t * (2 * h_loc + 2 * kv_loc) * hd * dt + 2 * b_loc * t * d * dt
    kv_shape = (L, batch, seq, cfg.num_key_value_heads, hd)
    kv_spec = fit_spec(ACTIVATION_RULES["kv_cache"], kv_shape, mesh)
    gathered = _layer_compute_elems(cfg, mesh)
    out = {"program": program, "b_loc": b_loc, "n_loc": n_loc, "rows": rows, "shapes": shapes, "specs": specs,
           "param_elems": elems, "params": n_param * pt}
    if program == "train":
        lora = lora_elems(cfg, mesh, lora_rank, lora_targets) * 4 if lora_rank else 0
        if remat == "full":
            saved = L * b_loc * seq * d * dt                   # each layer's input; the rest is recomputed
        else:                                                 # none / dots: every layer's intermediates stay
            saved = L * (qkvo + moe + 2 * b_loc * seq * h_loc * 4)
        chunk = min(ce_chunk, seq)
        trained = lora if lora_rank else n_param * pt            # what has gradients and moments (fp32 adapters)
        out.update({
            "adapters": lora,
            "grads": trained,
            "adam": 2 * trained,
            # optax's update, a full tree in the param dtype beside the gradients (calibrated against compiled
            # v5e-256 and v5p-64 train steps: the plan is then 0.90x and 1.02x memory_analysis' totals)
            "update": trained,
            "saved": saved,
            # one layer's weights in the compute dtype, for this layer and the next one prefetched, and the
            # layer's weight gradient before its reduce-scatter (param dtype; none for a frozen LoRA base)
            "weights": gathered * (2 * dt + (0 if lora_rank else pt)),
            "layer": 2 * (qkvo + moe),                         # its forward and backward working set
            "logits": 3 * b_loc * chunk * v_loc * 4,           # one CE chunk: logits, softmax, their gradient (fp32)
        })
        keys = ("params", *(("adapters",) if lora_rank else ()), "grads", "adam", "update", "saved", "weights",
                "layer", "logits")
    else:
        out.update({
            "kv": 2 * shard_bytes(kv_shape, dtype, kv_spec, mesh),
            "layer": qkvo + moe + b_loc * h_loc * seq * 4,     # one token: projections, MoE rows, scores over the cache
            "logits": 2 * b_loc * v_loc * 4,
        })
        keys = ("params", "kv", "layer", "logits")
    out["total"] = sum(out[k] for k in keys)
    out["items"] = keys
    return out


LABELS = {
    "params": "weights", "adapters": "LoRA adapters (float32)", "grads": "gradients", "adam": "AdamW m, v",
    "update": "optimizer update",
    "saved": "activations kept for the backward",
    "weights": "one layer's weights gathered (x2 prefetch) + its gradient", "layer": "one layer's working set",
    "logits": "cross-entropy logits", "kv": "KV cache",
}


def format_plan(name: str, cfg: Qwen3Config, mesh: dict[str, int], dtype: str, batch: int, seq: int, *,
                program="train", param_dtype=None, remat="full", buffer_factor=1.25, capacity_factor=None,
                dispatch="ragged", ce_chunk=512, lora_rank=None, lora_targets=None) -> str:
    lora_rank = lora_rank if program == "train" else None
    if param_dtype is None:
        param_dtype = "bfloat16" if lora_rank else "float32"
    r = plan(cfg, mesh, dtype, batch, seq, program=program, param_dtype=param_dtype, remat=remat,
             buffer_factor=buffer_factor, capacity_factor=capacity_factor, dispatch=dispatch, ce_chunk=ce_chunk,
             lora_rank=lora_rank, lora_targets=lora_targets)
    mesh = {a: int(mesh.get(a, 1)) for a in AXES}
    counts = param_count(cfg)
    n_dev = math.prod(mesh.values())
    g = lambda b: f"{b / GiB:9.2f}"  # noqa: E731
    mesh_s = " ".join(f"{a}={mesh[a]}" for a in AXES)
    if dispatch == "ragged":
        moe = f"ragged dispatch, receive buffer {'worst case' if buffer_factor is None else f'{buffer_factor}x'}"
    else:
        moe = f"padded dispatch, {'worst case' if capacity_factor is None else f'capacity factor {capacity_factor}'}"
    weights = (f"frozen {param_dtype} weights + LoRA rank {lora_rank} adapters (float32, AdamW)" if lora_rank else
               f"{param_dtype} master weights")
    head = (f"train step: batch {batch} x seq {seq}, {dtype} compute, {weights}, remat {remat}, "
            f"CE chunk {ce_chunk}" if program == "train" else
            f"decode step: batch {batch} rows x {seq}-slot KV cache, {dtype} weights (serving layout)")
    lines = [
        f"{name}: {counts['total'] / 1e9:.2f}B parameters ({counts['active'] / 1e9:.2f}B active)",
        f"{head}",
        f"mesh {mesh_s} = {n_dev} devices -> {r['b_loc']} rows and {r['n_loc']} MoE tokens per device; MoE {moe} "
        f"({r['rows']} rows)",
        "",
        f"{'per device':<60}{'GiB':>9}",
    ]
    for key in r["items"]:
        label = "logits and sampling" if key == "logits" and program == "decode" else LABELS[key]
        if lora_rank and key in ("grads", "adam", "update"):
            label += " (adapters only)"
        lines.append(f"{'  ' + label:<60}{g(r[key])}")
    lines += [f"{'  = total':<60}{g(r['total'])}", "",
              f"{'fits (<= ' + str(int(HEADROOM * 100)) + '% of HBM)':<22}"]
    for dev, hbm in DEVICES.items():
        lines.append(f"{'  ' + dev + f' {hbm}G':<22}{'yes' if r['total'] <= HEADROOM * hbm * GiB else 'no':>6}")
    lines += ["", f"{'parameter layout':<42}{'global shape':<24}{'spec':<42}{'MiB/device':>10}"]
    itemsize = np.dtype(jnp.dtype(param_dtype if program == "train" else dtype)).itemsize
    for path, shape in r["shapes"].items():
        spec = ", ".join("None" if s is None else str(s) for s in r["specs"][path])
        lines.append(f"  {'.'.join(path):<40}{str(list(shape)):<24}{spec:<42}"
                     f"{r['param_elems'][path] * itemsize / 2**20:>10.1f}")
    return "\n".join(lines)


def parser():
    from qwen3_jax.launch import ArgumentParser

    ap = ArgumentParser(prog="qwen3-jax-plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="Qwen3-30B-A3B", help=f"one of {', '.join(Qwen3Config.presets())}")
    ap.add_argument("--config", help="a config.json or checkpoint directory (instead of --preset)")
    ap.add_argument("--mesh", default="fsdp=32,expert=8", help="axis sizes, e.g. fsdp=32,expert=8 (data, fsdp, "
                    "expert, tensor)")
    ap.add_argument("--program", choices=PROGRAMS, default="train", help="the train step or one decode step")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                    help="compute dtype (decode: also the weights and the KV cache)")
    ap.add_argument("--param-dtype", choices=["bfloat16", "float32", "float16"],
                    help="train: master weight and optimizer dtype, float32 unless given; with --lora-rank the frozen "
                    "base's, bfloat16 unless given")
    ap.add_argument("--batch-size", "--batch", dest="batch", type=int, default=256, metavar="N",
                    help="global batch (sequences, or decode rows)")
    ap.add_argument("--seq-len", "--seq", dest="seq", type=int, default=4096, metavar="N",
                    help="sequence length (train) or KV cache slots (decode)")
    ap.add_argument("--remat", default="full", choices=["full", "dots", "none"], help="train: as qwen3-jax-train")
    ap.add_argument("--ce-chunk", type=int, default=512, help="train: cross-entropy positions per chunk")
    ap.add_argument("--dispatch", choices=("ragged", "padded"), default="ragged",
                    help="EP dispatch (ragged on GPU/TPU; padded on CPU and v5e slices over 16 chips)")
    ap.add_argument("--ep-buffer-factor", type=float, default=1.25,
                    help="ragged dispatch receive buffer, x the mean routed rows (0: worst case)")
    ap.add_argument("--capacity-factor", type=float, default=None,
                    help="padded dispatch per-pair buffers, x the mean routed rows (default: the worst case)")
    ap.add_argument("--lora-rank", type=int, metavar="R", help="train: LoRA adapters of rank R on the frozen model "
                    "(as qwen3-jax-train --lora-rank)")
    ap.add_argument("--lora-targets", metavar="q_proj,k_proj,v_proj,o_proj", help="train: the adapted projections")
    return ap


def main(argv=None) -> int:
    from qwen3_jax.launch import AT_LEAST_0, AT_LEAST_1, POSITIVE, check_bounds, default_platform, fail

    ap = parser()
    try:
        a = ap.parse_args(argv)
        check_bounds(ap, a, batch=AT_LEAST_1, seq=AT_LEAST_1, ce_chunk=AT_LEAST_1, ep_buffer_factor=AT_LEAST_0,
                     capacity_factor=POSITIVE, lora_rank=AT_LEAST_1)
        if a.lora_targets and not a.lora_rank:
            ap.error("--lora-targets needs --lora-rank R")
    except SystemExit as e:  # --help, --version (0) or a usage error (2, its one line already printed)
        return int(e.code or 0)
    default_platform()
    try:
        cfg = Qwen3Config.from_pretrained(a.config) if a.config else Qwen3Config.preset(a.preset)
        mesh = parse_mesh(a.mesh)
        targets = None
        if a.lora_targets:
            from qwen3_jax.lora import parse_targets

            targets = parse_targets(a.lora_targets)
        text = format_plan(a.config or a.preset, cfg, mesh, a.dtype, a.batch, a.seq, program=a.program,
                           param_dtype=a.param_dtype, remat=a.remat, buffer_factor=a.ep_buffer_factor or None,
                           capacity_factor=a.capacity_factor, dispatch=a.dispatch, ce_chunk=a.ce_chunk,
                           lora_rank=a.lora_rank, lora_targets=targets)
    except (ValueError, KeyError, OSError) as e:
        return fail(ap.prog, e, 2)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
