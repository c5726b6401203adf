"""Ahead-of-time compilation for accelerators this machine does not have: the real train and decode programs of
any config on any TPU topology and mesh, with abstract (unallocated) parameters, and what they cost per chip.

    from qwen3_jax.aot import topology_devices, compile_report
    devices = topology_devices("v5e:16x16")                              # 256 abstract TPU v5e chips
    mesh = make_mesh(fsdp=32, expert=8, devices=devices)
    lowered = qwen3_jax.train.lower_train_step(cfg, mesh, batch_size=256, seq_len=4096)
    compiled = lowered.compile()                                          # the real TPU compiler, on this CPU
    report = compile_report(cfg, "v5e:16x16", {"fsdp": 32, "expert": 8}, program="train", batch=256, seq_len=4096)

`qwen3-jax-compile` prints the report: HBM per chip from memory_analysis (arguments, outputs, temporaries, total;
whether it fits in 90% of the chip), FLOPs per chip against the model's arithmetic, the collectives, the compile
time, and `qwen3-jax-plan`'s estimate beside the compiled figure. FLOPs come from programs with the layers
unrolled (cost_analysis counts a loop body once): per layer = FLOPs(2 layers) - FLOPs(1 layer); a Pallas kernel
counts through its cost estimate (megablox: 2 m k n over its padded rows; splash attention reports none, so the
train program's attention FLOPs are absent from the compiled figure and listed apart).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from .config import Qwen3Config
from .runtime import Runtime

GiB = 2**30
HEADROOM = 0.9
# HBM per chip (bytes) by device kind
HBM = {"TPU v5 lite": 16 * GiB, "TPU v5e": 16 * GiB, "TPU v5": 95 * GiB, "TPU v5p": 95 * GiB, "TPU v6 lite": 32 * GiB,
       "TPU v6e": 32 * GiB, "TPU v4": 32 * GiB, "NVIDIA H100 80GB HBM3": 80 * GiB, "NVIDIA H200": 141 * GiB}
COLLECTIVES = ("ragged-all-to-all", "all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")


def topology_devices(topology: str):
    """Abstract devices of a TPU topology such as "v5e:16x16" or "v5p:2x2x2" (needs libtpu: the `jax[tpu]` extra;
    no TPU). Set ALLOW_MULTIPLE_LIBTPU_LOAD=1 when several processes load libtpu."""
    from jax.experimental import topologies

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
    except Exception as e:  # noqa: BLE001 -- libtpu missing or an unknown name: say which
        raise ValueError(f"TPU topology {topology!r}: {e} (needs libtpu: pip install 'jax[tpu]=={jax.__version__}'; "
                         "names like v5e:16x16, v5p:4x4x4, v6e:8x8, v4:2x2x2)") from None


def hbm_bytes(device) -> int | None:
    return HBM.get(getattr(device, "device_kind", ""))


def abstract_model(cfg: Qwen3Config, runtime: Runtime, *, dtype, param_dtype, rules=None):
    """(graphdef, abstract state, params) of the model on runtime.mesh with nothing allocated: params is the pure
    dict of ShapeDtypeStructs, each with the NamedSharding the rules give it."""
    from qwen3_jax.model import Qwen3ForCausalLM
    from qwen3_jax.sharding import param_shardings
    from qwen3_jax.train.step import split_model

    model = nnx.eval_shape(lambda: Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.dtype(dtype),
                                                    param_dtype=jnp.dtype(param_dtype), runtime=runtime))
    graphdef, abstract_state, params = split_model(model)
    shardings = param_shardings(cfg, runtime.mesh, rules)

    def attach(kp, x):
        path = tuple(str(getattr(k, "key", k)) for k in kp)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings[path])

    return graphdef, abstract_state, jax.tree_util.tree_map_with_path(attach, params)


# ============================================================================ the model's arithmetic
def layer_matmul_params(cfg: Qwen3Config, moe: bool = True) -> int:
    """Parameters one token multiplies by in one layer: attention projections, and the router plus top-k experts
    (or the dense MLP)."""
    d, h, kv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    attn = d * (h + 2 * kv) * hd + h * hd * d
    if moe and cfg.is_moe:
        return attn + d * cfg.num_experts + cfg.num_experts_per_tok * 3 * d * cfg.moe_intermediate_size
    return attn + 3 * d * cfg.intermediate_size


def model_flops(cfg: Qwen3Config, program: str, batch: int, seq_len: int, lora_rank: int | None = None) -> dict:
    """Global FLOPs of one step, per layer and in all (matmuls and attention apart).
    train: 6 x tokens x matmul parameters + causal attention 6 x tokens x H x hd x T (half of the full 12);
    LoRA (lora_rank, the four attention projections): the frozen weights 4 x (forward and input gradient, no weight
    gradient), the adapters 6 x their parameters;
    decode: 2 x batch x matmul parameters + attention over the seq_len-slot cache 4 x batch x H x hd x S."""
    h_hd = cfg.num_attention_heads * cfg.head_dim
    tokens = batch * seq_len if program == "train" else batch
    mul, attn = (6, 6 * tokens * h_hd * seq_len) if program == "train" else (2, 4 * batch * h_hd * seq_len)
    adapters = 0
    if program == "train" and lora_rank:
        d, kv_hd = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
        mul, adapters = 4, 6 * tokens * lora_rank * (2 * (d + h_hd) + 2 * (d + kv_hd))
    layer = mul * tokens * layer_matmul_params(cfg) + adapters
    head = mul * tokens * cfg.hidden_size * cfg.vocab_size
    return {"layer_matmul": layer, "layer_attention": attn, "layer": layer + attn,
            "total": cfg.num_hidden_layers * (layer + attn) + head}


# ============================================================================ reading a compiled program
def memory(compiled, device) -> dict:
    m = compiled.memory_analysis()
    out = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
           "temporaries": m.temp_size_in_bytes, "aliased": m.alias_size_in_bytes,
           "code": m.generated_code_size_in_bytes}
    out["total"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"] + out["code"]
    hbm = hbm_bytes(device)
    out["hbm"] = hbm
    out["fits"] = None if hbm is None else out["total"] <= HEADROOM * hbm
    return out


def flops(compiled) -> float:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca.get("flops", 0.0))


def collectives(hlo_text: str) -> dict:
    """Collective ops of a compiled HLO module by kind (an async start/done pair counts once)."""
    counts = {}
    for kind in COLLECTIVES:
        n = hlo_text.count(f" {kind}(") + hlo_text.count(f" {kind}-start(")
        if n:
            counts[kind] = n
    return counts


def kernels_in(hlo_text: str) -> dict:
    """Pallas (Mosaic) kernels of a compiled TPU module by kind: megablox gmm / tgmm, splash attention."""
    out = {"gmm": 0, "tgmm": 0, "splash": 0, "other": 0}
    for line in hlo_text.splitlines():
        if 'custom_call_target="tpu_custom_call"' not in line:
            continue
        name = re.search(r'op_name="([^"]*)"', line)
        name = name.group(1) if name else ""
        kind = ("splash" if "splash" in line else "tgmm" if "tgmm" in name else "gmm" if "gmm" in name else "other")
        out[kind] += 1
    return out


# ============================================================================ the report
def lower(cfg, mesh, program: str, *, batch: int, seq_len: int, dtype="bfloat16", param_dtype="float32",
          remat="full", scan_layers=True, **kw):
    if program == "train":
        from qwen3_jax.train.step import lower_train_step

        return lower_train_step(cfg, mesh, batch_size=batch, seq_len=seq_len, dtype=dtype, param_dtype=param_dtype,
                                remat=remat, scan_layers=scan_layers, **kw)
    if program == "decode":
        from qwen3_jax.infer.engine import lower_decode_step

        return lower_decode_step(cfg, mesh, batch_size=batch, max_len=seq_len, dtype=dtype, scan_layers=scan_layers,
                                 **kw)
    raise ValueError(f"program {program!r}: choose train or decode")


def compile_report(cfg: Qwen3Config, topology: str, mesh_sizes: dict, *, program: str, batch: int, seq_len: int,
                   dtype="bfloat16", param_dtype=None, remat="full", count_flops: bool = True,
                   plan_estimate: bool = True, devices=None, **kw) -> dict:
    """Compile `program` for `topology` on a mesh of `mesh_sizes` and read it (see the module docstring).
    kw: the program's options (train: lower_train_step's, e.g. lora_rank=16; param_dtype then defaults to bfloat16
    for the frozen base, else float32)."""
    from qwen3_jax.sharding import make_mesh

    lora_rank = kw.get("lora_rank") if program == "train" else None
    if param_dtype is None:
        param_dtype = "bfloat16" if lora_rank else "float32"

    devices = devices if devices is not None else topology_devices(topology)
    mesh = make_mesh(**mesh_sizes, devices=devices)
    chips = mesh.size
    t0 = time.perf_counter()
    lowered = lower(cfg, mesh, program, batch=batch, seq_len=seq_len, dtype=dtype, param_dtype=param_dtype,
                    remat=remat, **kw)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    text = compiled.as_text()
    rep = {"program": program, "topology": topology, "device_kind": devices[0].device_kind, "chips": chips,
           "mesh": {k: int(v) for k, v in mesh.shape.items()}, "batch": batch, "seq_len": seq_len, "dtype": dtype,
           "param_dtype": param_dtype if program == "train" else dtype, "remat": remat if program == "train" else None,
           "lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2), "memory": memory(compiled, devices[0]),
           "collectives": collectives(text), "kernels": kernels_in(text)}
    if lora_rank:
        rep["lora_rank"] = lora_rank
    math_f = model_flops(cfg, program, batch, seq_len, lora_rank)
    rep["model_flops_per_chip"] = {k: v / chips for k, v in math_f.items()}
    if count_flops:
        rep["flops"] = layer_flops(cfg, mesh, program, batch=batch, seq_len=seq_len, dtype=dtype,
                                   param_dtype=param_dtype, **kw)
        per_layer = rep["flops"]["per_layer"]
        want = math_f["layer"] / chips
        if program == "train" and rep["kernels"]["splash"]:
            want = math_f["layer_matmul"] / chips     # splash reports no cost: compare against the matmuls alone
            rep["flops"]["attention_uncounted"] = True
        rep["flops"]["per_layer_model"] = want
        rep["flops"]["per_layer_ratio"] = per_layer / want if want else None
    if plan_estimate:
        from qwen3_jax.sharding.plan import plan

        bf = kw.get("ep_buffer_factor", Runtime.ep_buffer_factor)
        ks = Runtime(mesh=mesh, ep_buffer_factor=bf, capacity_factor=kw.get("capacity_factor")).kernels
        padded = ks.ep_dispatch == "padded"          # e.g. v5e over 16 chips: the dispatch the program compiled
        est = plan(cfg, dict(rep["mesh"]), dtype, batch, seq_len, remat=remat, program=program,
                   param_dtype=param_dtype, buffer_factor=bf, dispatch="padded" if padded else "ragged",
                   capacity_factor=(kw.get("capacity_factor") or ks.padded_capacity) if padded else None,
                   lora_rank=lora_rank, lora_targets=kw.get("lora_targets"))
        rep["ep_dispatch"] = ks.ep_dispatch
        rep["plan_total"] = est["total"]
    return rep


def layer_flops(cfg, mesh, program, *, batch, seq_len, dtype, param_dtype, **kw) -> dict:
    """Per-chip FLOPs of one layer: programs of 1 and 2 unrolled layers, no remat (the train step's cross-entropy in
    one chunk, so no loop hides the unembedding). Returns per_layer and the estimated total for the full depth."""
    out = {}
    for n in (1, 2):
        small = cfg.replace(num_hidden_layers=n, mlp_only_layers=[], decoder_sparse_step=1)
        extra = dict(kw)
        if program == "train":
            extra.setdefault("ce_chunk", seq_len)
            extra["remat"] = "none"
        c = lower(small, mesh, program, batch=batch, seq_len=seq_len, dtype=dtype, param_dtype=param_dtype,
                  scan_layers=False, **extra).compile()
        out[n] = flops(c)
    per_layer = out[2] - out[1]
    return {"one_layer": out[1], "two_layers": out[2], "per_layer": per_layer,
            "total": out[1] + (cfg.num_hidden_layers - 1) * per_layer}


def format_report(r: dict) -> str:
    g = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
    m = r["memory"]
    mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "one chip"
    lines = [f"{r['program']} step on {r['topology']} ({r['chips']} x {r['device_kind']}), mesh {mesh}; "
             f"batch {r['batch']} x {'seq' if r['program'] == 'train' else 'cache'} {r['seq_len']}, {r['dtype']}"
             + ((f" (frozen {r['param_dtype']} weights, LoRA rank {r['lora_rank']} adapters)" if r.get("lora_rank")
                 else f" (master {r['param_dtype']})") + f", remat {r['remat']}" if r["program"] == "train" else ""),
             f"  compile {r['compile_s']:.1f} s (lower {r['lower_s']:.1f} s)",
             "  HBM per chip (memory_analysis):",
             f"    arguments {g(m['arguments'])}   outputs {g(m['outputs'])}   temporaries {g(m['temporaries'])}   "
             f"aliased {g(m['aliased'])}",
             f"    total     {g(m['total'])}" + ("" if m["hbm"] is None else
                                                  f"   of {g(m['hbm'])}: {m['total'] / m['hbm']:.0%} -> "
                                                  f"{'fits' if m['fits'] else 'DOES NOT FIT'} in {HEADROOM:.0%}")]
    if "plan_total" in r:
        lines.append(f"    qwen3-jax-plan estimate {g(r['plan_total'])} ({r['plan_total'] / max(m['total'], 1):.2f}x "
                     "the compiled total)")
    if "flops" in r:
        f = r["flops"]
        note = " (matmuls; splash attention reports no FLOPs)" if f.get("attention_uncounted") else ""
        lines += ["  FLOPs per chip (layers unrolled: 2 layers - 1 layer):",
                  f"    per layer {f['per_layer']:.4g}   model {f['per_layer_model']:.4g}{note}   "
                  f"ratio {f['per_layer_ratio']:.3f}",
                  f"    step      {f['total']:.4g}   model {r['model_flops_per_chip']['total']:.4g}"]
    coll = ", ".join(f"{k} x{v}" for k, v in r["collectives"].items()) or "none"
    lines.append(f"  collectives: {coll}")
    ker = ", ".join(f"{k} x{v}" for k, v in r["kernels"].items() if v) or "none"
    lines.append(f"  Pallas kernels: {ker}")
    return "\n".join(lines)


def parse_mesh(text: str) -> dict[str, int]:
    from qwen3_jax.sharding.plan import parse_mesh as pm

    return {k: v for k, v in pm(text).items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="qwen3-jax-compile", description="Compile the train or decode step for a TPU "
                                 "topology ahead of time (no TPU needed) and print HBM, FLOPs and collectives per chip.")
    ap.add_argument("--preset", default="Qwen3-30B-A3B", help=f"one of {', '.join(Qwen3Config.presets())}")
    ap.add_argument("--config", help="a config.json or checkpoint directory (instead of --preset)")
    ap.add_argument("--topology", default="v5e:16x16", help="TPU topology, e.g. v5e:16x16, v5p:4x4x4, v6e:8x8")
    ap.add_argument("--mesh", default="fsdp=32,expert=8", help="axis sizes, e.g. fsdp=32,expert=8 (data, fsdp, expert, "
                    "tensor); their product is the topology's chip count")
    ap.add_argument("--program", choices=("train", "decode"), default="train")
    ap.add_argument("--batch", type=int, default=256, help="global batch: sequences (train) or rows (decode)")
    ap.add_argument("--seq-len", type=int, default=4096, help="sequence length (train) or cache slots (decode)")
    ap.add_argument("--remat", choices=("full", "dots", "none"), default="full", help="train: rematerialisation")
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype (decode: also the weights and cache)")
    ap.add_argument("--param-dtype", help="train: master weight dtype, float32 unless given; with --lora-rank the "
                    "frozen base's, bfloat16 unless given")
    ap.add_argument("--ep-buffer-factor", type=float, default=Runtime.ep_buffer_factor,
                    help="ragged EP dispatch receive buffer, x the mean routed rows (0: worst case, never drops)")
    ap.add_argument("--lora-rank", type=int, metavar="R", help="train: LoRA adapters of rank R on the frozen model "
                    "(lower_train_step(lora_rank=R), as qwen3-jax-train --lora-rank)")
    ap.add_argument("--lora-targets", metavar="q_proj,k_proj,v_proj,o_proj", help="train: the adapted projections")
    ap.add_argument("--no-flops", action="store_true", help="skip the two unrolled programs that count FLOPs")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    a = ap.parse_args(argv)
    try:
        cfg = Qwen3Config.from_pretrained(a.config) if a.config else Qwen3Config.preset(a.preset)
        kw = {"ep_buffer_factor": a.ep_buffer_factor or None}
        if a.lora_rank is not None or a.lora_targets:
            if a.program != "train" or not a.lora_rank or a.lora_rank < 1:
                raise ValueError("--lora-rank R (>= 1) applies to --program train" + (
                    "; --lora-targets needs it" if a.lora_targets else ""))
            from qwen3_jax.lora import parse_targets

            kw["lora_rank"] = a.lora_rank
            if a.lora_targets:
                kw["lora_targets"] = parse_targets(a.lora_targets)
        rep = compile_report(cfg, a.topology, parse_mesh(a.mesh), program=a.program, batch=a.batch,
                             seq_len=a.seq_len, dtype=a.dtype, param_dtype=a.param_dtype, remat=a.remat,
                             count_flops=not a.no_flops, **kw)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"qwen3-jax-compile: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 -- the compiler's own errors (e.g. RESOURCE_EXHAUSTED): one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"qwen3-jax-compile: error: the program does not compile: {msg[:2000]}", file=sys.stderr)
        return 1
    rep["preset"] = a.config or a.preset
    print(json.dumps(rep, indent=1, default=float) if a.json else format_report(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
