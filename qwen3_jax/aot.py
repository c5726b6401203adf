"""Ahead-of-time compilation for accelerators this machine does not have: the real train and decode programs of
any config on any TPU topology or GPU nodes and mesh, with abstract (unallocated) parameters, and what they cost
per chip.

    from qwen3_jax.aot import topology_devices, compile_report
    devices = topology_devices("v5e:16x16")                              # 256 abstract TPU v5e chips
    devices = topology_devices("h100:2x8")                               # 2 nodes x 8 abstract H100s
    mesh = make_mesh(fsdp=32, expert=8, devices=devices)
    lowered = qwen3_jax.train.lower_train_step(cfg, mesh, batch_size=256, seq_len=4096)
    compiled = lowered.compile()                                          # the real TPU / GPU compiler, on this CPU
    report = compile_report(cfg, "v5e:16x16", {"fsdp": 32, "expert": 8}, program="train", batch=256, seq_len=4096)

`qwen3-jax-compile` prints the report: HBM per chip from memory_analysis (arguments, outputs, temporaries, total;
whether it fits in 90% of the chip), FLOPs per chip against the model's arithmetic, the collectives and kernels,
the compile time, and `qwen3-jax-plan`'s estimate beside the compiled figure. FLOPs come from programs with the
layers unrolled (cost analysis counts a loop body once): per layer = FLOPs(2 layers) - FLOPs(1 layer).
- TPU: `cost_analysis()`; a Pallas kernel counts through its cost estimate (megablox: 2 m k n over its padded rows;
  splash attention reports none, so the train program's attention FLOPs are absent and it is compared against
  the matmuls).
- GPU: executables have no cost_analysis(); the HLO module's cost analysis runs on this host. It cannot see custom
  calls: the grouped-matmul kernels (tokamax, Mosaic GPU or Triton) are added from their shapes (`gpu_kernels`,
  2 m k n over their buffer rows) and reported apart, and cuDNN attention, like splash, is left out of the train
  comparison.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

import jax

from .config import Qwen3Config
from .kernels import GMM as GMM_CHOICES
from .runtime import Runtime

GiB = 2**30
HEADROOM = 0.9
# HBM per chip (bytes) by device kind; GPUs: from their target spec (GPU_SPECS)
HBM = {"TPU v5 lite": 16 * GiB, "TPU v5e": 16 * GiB, "TPU v5": 95 * GiB, "TPU v5p": 95 * GiB, "TPU v6 lite": 32 * GiB,
       "TPU v6e": 32 * GiB, "TPU v4": 32 * GiB}
COLLECTIVES = ("ragged-all-to-all", "all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")
# GPU name -> XLA target spec shipped in qwen3_jax/gpu_specs (compiling for GPUs that are not there)
GPU_SPECS = {"h100": "h100_sxm.txtpb", "h200": "h200_sxm.txtpb"}
_GPU_TOPOLOGY = re.compile(r"^(?P<gpu>[a-uw-z][a-z0-9]*):(?P<nodes>[0-9]+)x(?P<gpus>[0-9]+)$")  # TPUs are v*


def gpu_spec(name: str) -> str:
    """The text of the XLA target spec of GPU `name` (h100, h200), as get_topology_desc takes it."""
    if name not in GPU_SPECS:
        raise ValueError(f"GPU {name!r}: choose from {', '.join(GPU_SPECS)}")
    with open(os.path.join(os.path.dirname(__file__), "gpu_specs", GPU_SPECS[name])) as f:
        text = f.read()
    kind = re.search(r'device_description_str: "([^"]+)"', text).group(1)
    HBM.setdefault(kind, int(re.search(r"device_memory_size: ([0-9]+)", text).group(1)))
    return text


def topology_devices(topology: str):
    """Abstract devices of a topology, nothing allocated:
    - TPU slices such as "v5e:16x16" or "v5p:2x2x2" (needs libtpu: the `tpu` extra; no TPU). Set
      ALLOW_MULTIPLE_LIBTPU_LOAD=1 when several processes load libtpu.
    - GPU nodes "h100:NODESxGPUS" such as "h100:2x8" (2 nodes of 8 H100 SXM), "h200:1x8" (needs the CUDA plugin:
      the `gpu` extra; no GPU)."""
    from jax.experimental import topologies

    from qwen3_jax.kernels import accelerator_present

    gpu = _GPU_TOPOLOGY.match(topology.strip().lower())
    if gpu:
        spec = gpu_spec(gpu["gpu"])
        nodes, per_node = int(gpu["nodes"]), int(gpu["gpus"])
        if nodes < 1 or per_node < 1:
            raise ValueError(f"GPU topology {topology!r}: NODESxGPUS must be at least 1x1")
        try:
            return topologies.get_topology_desc(platform="cuda", target_config=spec,
                                                topology=f"1x{nodes}x{per_node}").devices
        except Exception as e:  # noqa: BLE001 -- the CUDA plugin missing: say how to get it
            raise ValueError(f"GPU topology {topology!r}: {str(e).strip().splitlines()[0]} (needs the CUDA plugin: "
                             f"pip install 'jax[cuda12]=={jax.__version__}', or the qwen3-jax `gpu` extra)") from None
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if accelerator_present() != "tpu":
        # libtpu is loaded for its compiler only: without these it looks for a TPU VM's hosts and prints errors
        # about host bounds and worker hostnames (the abstract topology's devices are the same with them)
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")
    try:
        return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
    except Exception as e:  # noqa: BLE001 -- libtpu missing or an unknown name: say which
        import importlib.util

        names = "names like v5e:16x16, v5p:4x4x4, v6e:8x8, v4:2x2x2; GPU nodes: " + ", ".join(
            n + ":2x8" for n in GPU_SPECS)
        hint = (names if importlib.util.find_spec("libtpu") else
                f"needs libtpu: the tpu extra, pip install -e .[tpu], or pip install jax[tpu]=={jax.__version__}")
        raise ValueError(f"TPU topology {topology}: {e} ({hint})") from None


def hbm_bytes(device) -> int | None:
    return HBM.get(getattr(device, "device_kind", ""))


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


def flops(compiled) -> dict:
    """FLOPs of a compiled program: "xla", what XLA's cost analysis sees (TPU: `cost_analysis()`, which counts a
    Pallas kernel through its cost estimate; GPU executables have none, so the HLO module's cost analysis on this
    host), "kernels", the GPU grouped-matmul kernels' FLOPs from their shapes (custom calls XLA cannot see; see
    `gpu_kernel_flops`), and "total"."""
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    if ca is None:
        from jax._src.lib import _jax

        module = compiled.runtime_executable().hlo_modules()[0]
        ca = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
    seen = float(ca.get("flops", 0.0))
    hidden = sum(k["flops"] for k in gpu_kernels(compiled.as_text()) if k["kind"] in ("gmm", "tgmm"))
    return {"xla": seen, "kernels": float(hidden), "total": seen + hidden}


_SHAPE = re.compile(r"\b(?:bf16|f16|f32|f8e4m3fn|f8e5m2|s8)\[([0-9,]*)\]")


def _dims(text: str) -> list[tuple[int, ...]]:
    return [tuple(int(d) for d in m.group(1).split(",") if d) for m in _SHAPE.finditer(text)]


def gpu_kernels(hlo_text: str) -> list[dict]:
    """GPU custom-call kernels of a compiled module, with the FLOPs their shapes imply (XLA's cost analysis counts
    none of them):
    - "gmm": a grouped matmul x [M, K] by one of G matrices ([G, K, N]) into [M, N] (forward, d(x)): 2 M K N;
    - "tgmm": the transposed one, x^T [K, M] by dy [M, N] into per-group [G, K, N] (d(w)): 2 M K N;
    - "cudnn_attention": cuDNN's fused attention (forward or backward; FLOPs not counted).
    M is the rows of the kernel's buffer (routed rows plus the dispatch's slack), as megablox's cost estimate
    counts its padded rows on TPU. Triton and Mosaic GPU kernels other than tokamax's grouped matmul are "other"."""
    out = []
    for line in hlo_text.splitlines():
        target = re.search(r'custom_call_target="([^"]+)"', line)
        if target is None or " custom-call(" not in line:
            continue
        target = target.group(1)
        if target.startswith("__cudnn$fmha"):
            out.append({"kind": "cudnn_attention", "flops": 0})
            continue
        if target not in ("mosaic_gpu_v2", "mosaic_gpu", "__gpu$xla.gpu.triton"):
            continue
        if not re.search("ragged", line, re.IGNORECASE):    # tokamax names its kernels after ragged (contracting) dots
            out.append({"kind": "other", "flops": 0})
            continue
        result = _dims(line.split(" custom-call(")[0].split("=", 1)[1])
        ops = re.search(r"operand_layout_constraints=\{(.*?)\}\}", line)
        operands = [d for d in _dims(ops.group(1) if ops else line.split(" custom-call(")[1]) if len(d) in (2, 3)]
        res = next((d for d in result if len(d) in (2, 3)), None)
        mats = [d for d in operands if len(d) == 2]
        if res is None or not mats:
            out.append({"kind": "other", "flops": 0})
        elif len(res) == 2:           # [M, N] from x [M, K] (x's K matched by the group matrices): 2 M K N
            out.append({"kind": "gmm", "flops": 2 * mats[0][0] * mats[0][1] * res[1]})
        else:                         # [G, K, N] from [K, M] and [M, N] (either order): M = sqrt(|a| |b| / (K N))
            k, n = res[1], res[2]
            size = 1
            for d in mats[:2]:
                size *= d[0] * d[1]
            m = round((size / (k * n)) ** 0.5) if len(mats) >= 2 else mats[0][0] * mats[0][1] // k
            out.append({"kind": "tgmm", "flops": 2 * m * k * n})
    return out


def collectives(hlo_text: str) -> dict:
    """Collective ops of a compiled HLO module by kind (an async start/done pair counts once)."""
    counts = {}
    for kind in COLLECTIVES:
        n = hlo_text.count(f" {kind}(") + hlo_text.count(f" {kind}-start(")
        if n:
            counts[kind] = n
    return counts


def kernels_in(hlo_text: str) -> dict:
    """Kernels of a compiled module by kind: on TPU the Pallas (Mosaic) kernels, megablox gmm / tgmm and splash
    attention; on GPU tokamax's grouped matmul (gmm: forward and d(x), tgmm: d(w)) and cuDNN attention."""
    out = {"gmm": 0, "tgmm": 0, "splash": 0, "cudnn_attention": 0, "other": 0}
    for line in hlo_text.splitlines():
        if 'custom_call_target="tpu_custom_call"' not in line:
            continue
        name = re.search(r'op_name="([^"]*)"', line)
        name = name.group(1) if name else ""
        kind = ("splash" if "splash" in line else "tgmm" if "tgmm" in name else "gmm" if "gmm" in name else "other")
        out[kind] += 1
    for k in gpu_kernels(hlo_text):
        out[k["kind"]] += 1
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
    problem = megablox_tiling_error(cfg, mesh, program, kw.get("gmm", "auto"))
    if problem:
        raise ValueError(problem)
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
           "collectives": collectives(text), "kernels": kernels_in(text),
           "gmm": Runtime(mesh=mesh, gmm=kw.get("gmm", "auto")).kernels.gmm}
    if lora_rank:
        rep["lora_rank"] = lora_rank
    math_f = model_flops(cfg, program, batch, seq_len, lora_rank)
    rep["model_flops_per_chip"] = {k: v / chips for k, v in math_f.items()}
    if count_flops:
        rep["flops"] = layer_flops(cfg, mesh, program, batch=batch, seq_len=seq_len, dtype=dtype,
                                   param_dtype=param_dtype, **kw)
        f = rep["flops"]
        want = math_f["layer"] / chips
        if program == "train" and (rep["kernels"]["splash"] or rep["kernels"]["cudnn_attention"]):
            want = math_f["layer_matmul"] / chips     # the attention kernel reports no cost: the matmuls alone
            f["attention_uncounted"] = True
        f["per_layer_model"] = want
        f["per_layer_ratio"] = f["per_layer"] / want if want else None
        f["per_layer_xla_ratio"] = f["per_layer_xla"] / want if want else None
    if plan_estimate:
        from qwen3_jax.sharding.plan import plan

        bf = kw.get("ep_buffer_factor", Runtime.ep_buffer_factor)
        ks = Runtime(mesh=mesh, ep_buffer_factor=bf, capacity_factor=kw.get("capacity_factor"),
                     gmm=kw.get("gmm", "auto")).kernels
        padded = ks.ep_dispatch == "padded"          # e.g. v5e over 16 chips: the dispatch the program compiled
        est = plan(cfg, dict(rep["mesh"]), dtype, batch, seq_len, remat=remat, program=program,
                   param_dtype=param_dtype, buffer_factor=bf, dispatch="padded" if padded else "ragged",
                   capacity_factor=(kw.get("capacity_factor") or ks.padded_capacity) if padded else None,
                   lora_rank=lora_rank, lora_targets=kw.get("lora_targets"))
        rep["ep_dispatch"] = ks.ep_dispatch
        rep["plan_total"] = est["total"]
    return rep


def megablox_tiling_error(cfg: Qwen3Config, mesh, program: str, gmm: str = "auto") -> str | None:
    """Why the TPU grouped matmul (megablox) cannot compile `program`'s MoE layers on `mesh`, as one sentence that
    names the dimension and what would work; None when it can (or the program does not use megablox). Checked
    before lowering, so that the answer is not the Pallas lowering's multi-line block-shape error."""
    from qwen3_jax.kernels.gmm import megablox_tile_problem
    from qwen3_jax.partition import fit_spec

    uses = gmm == "megablox" or (gmm == "auto" and Runtime(mesh=mesh).kernels.gmm == "megablox")
    if not (cfg.is_moe and uses):
        return None
    d, f = cfg.hidden_size, cfg.moe_intermediate_size
    split = fit_spec((None, None, "tensor"), (cfg.num_experts, d, f), mesh.shape)[2] is not None
    f = f // mesh.shape["tensor"] if split else f           # each device's experts are F / tensor wide
    f_name = "moe_intermediate_size" + (f" / tensor ({cfg.moe_intermediate_size} / {mesh.shape['tensor']})"
                                        if split else "")
    backward = program == "train"
    for dims in ((("hidden_size", d), (f_name, f)), ((f_name, f), ("hidden_size", d))):
        problem = megablox_tile_problem(dims[0][1], dims[1][1], backward)
        if problem is None:
            continue
        which, tile, spanned = problem
        (name, size), (other, over) = (dims[0] if which == "k" else dims[1]), (dims[0] if spanned == "k" else dims[1])
        train_only = backward and megablox_tile_problem(dims[0][1], dims[1][1], False) is None
        where = f"spans {other} ({over}) in the train step's backward" if train_only else "does not span it"
        fix = (f"{name.split(' (')[0]} a multiple of 128 (e.g. {-(-size // 128) * 128})"
               + (f" or equal to {other}" if other != name else "") + " compiles")
        if split and name == f_name:
            ok = [t for t in range(mesh.shape["tensor"] - 1, 0, -1) if mesh.shape["tensor"] % t == 0
                  and cfg.moe_intermediate_size % t == 0
                  and not any(megablox_tile_problem(a, b, backward) for a, b in
                              ((d, cfg.moe_intermediate_size // t), (cfg.moe_intermediate_size // t, d)))]
            if ok:
                fix = f"a mesh with tensor={ok[0]} compiles (moe_intermediate_size / {ok[0]} = " \
                      f"{cfg.moe_intermediate_size // ok[0]})"
        return (f"{name} {size} cannot be tiled by the TPU grouped matmul (megablox): its tile of {tile} {where}, "
                f"and a TPU tile must be a multiple of 128 or the whole dimension; {fix}"
                + ("; --program decode compiles as it is" if train_only else ""))
    return None


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
    per_layer = out[2]["total"] - out[1]["total"]
    return {"one_layer": out[1]["total"], "two_layers": out[2]["total"], "per_layer": per_layer,
            "per_layer_xla": out[2]["xla"] - out[1]["xla"], "per_layer_kernels": out[2]["kernels"] - out[1]["kernels"],
            "total": out[1]["total"] + (cfg.num_hidden_layers - 1) * per_layer}


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
        note = " (matmuls; the attention kernel reports no FLOPs)" if f.get("attention_uncounted") else ""
        lines += ["  FLOPs per chip (layers unrolled: 2 layers - 1 layer):",
                  f"    per layer {f['per_layer']:.4g}   model {f['per_layer_model']:.4g}{note}   "
                  f"ratio {f['per_layer_ratio']:.3f}"]
        if f.get("per_layer_kernels"):
            lines.append(f"      of which XLA's cost analysis {f['per_layer_xla']:.4g} (ratio {f['per_layer_xla_ratio']:.3f})"
                         f" + grouped-matmul kernels {f['per_layer_kernels']:.4g}, counted from their shapes")
        lines.append(f"    step      {f['total']:.4g}   model {r['model_flops_per_chip']['total']:.4g}")
    coll = ", ".join(f"{k} x{v}" for k, v in r["collectives"].items()) or "none"
    lines.append(f"  collectives: {coll}")
    ker = ", ".join(f"{k} x{v}" for k, v in r["kernels"].items() if v) or "none"
    lines.append(f"  kernels: {ker} (grouped matmul: {r['gmm']})")
    return "\n".join(lines)


def parser():
    from qwen3_jax.launch import ArgumentParser

    ap = ArgumentParser(prog="qwen3-jax-compile", description="Compile the train or decode step for a TPU "
                        "topology or GPU nodes ahead of time (no TPU or GPU needed) and print HBM, FLOPs, "
                        "collectives and kernels per chip.")
    ap.add_argument("--preset", default="Qwen3-30B-A3B", help=f"one of {', '.join(Qwen3Config.presets())}")
    ap.add_argument("--config", help="a config.json or checkpoint directory (instead of --preset)")
    ap.add_argument("--topology", default="v5e:16x16", help="TPU topology, e.g. v5e:16x16, v5p:4x4x4, v6e:8x8; "
                    "or GPU nodes NODESxGPUS: h100:2x8, h200:1x8")
    ap.add_argument("--mesh", default="fsdp=32,expert=8", help="axis sizes, e.g. fsdp=32,expert=8 (data, fsdp, expert, "
                    "tensor); their product is the topology's chip count")
    ap.add_argument("--program", choices=("train", "decode"), default="train")
    ap.add_argument("--batch-size", "--batch", dest="batch", type=int, default=256, metavar="N",
                    help="global batch: sequences (train) or rows (decode)")
    ap.add_argument("--seq-len", "--seq", dest="seq_len", type=int, default=4096, metavar="N",
                    help="sequence length (train) or cache slots (decode)")
    ap.add_argument("--remat", choices=("full", "dots", "none"), default="full", help="train: rematerialisation")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"),
                    help="compute dtype (decode: also the weights and cache)")
    ap.add_argument("--param-dtype", choices=("bfloat16", "float32", "float16"),
                    help="train: master weight dtype, float32 unless given; with --lora-rank the frozen base's, "
                    "bfloat16 unless given")
    ap.add_argument("--ep-buffer-factor", type=float, default=Runtime.ep_buffer_factor,
                    help="ragged EP dispatch receive buffer, x the mean routed rows (0: worst case, never drops)")
    ap.add_argument("--gmm", default="auto", choices=("auto",) + GMM_CHOICES,
                    help="the experts' grouped matmul (auto: the platform's, see qwen3_jax.kernels)")
    ap.add_argument("--lora-rank", type=int, metavar="R", help="train: LoRA adapters of rank R on the frozen model "
                    "(lower_train_step(lora_rank=R), as qwen3-jax-train --lora-rank)")
    ap.add_argument("--lora-targets", metavar="q_proj,k_proj,v_proj,o_proj", help="train: the adapted projections")
    ap.add_argument("--no-flops", action="store_true", help="skip the two unrolled programs that count FLOPs")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    return ap


def main(argv=None) -> int:
    from qwen3_jax.launch import AT_LEAST_0, AT_LEAST_1, check_bounds, default_platform, fail
    from qwen3_jax.sharding.mesh import parse_mesh

    ap = parser()
    try:
        a = ap.parse_args(argv)
        check_bounds(ap, a, batch=AT_LEAST_1, seq_len=AT_LEAST_1, ep_buffer_factor=AT_LEAST_0)
    except SystemExit as e:  # --help, --version (0) or a usage error (2, its one line already printed)
        return int(e.code or 0)
    default_platform()
    if not jax.config.jax_platforms:
        from jax._src import xla_bridge

        if not xla_bridge.backends_are_initialized():
            # nothing runs on a device here: the host's CPU backend compiles for the abstract chips (on a GPU or
            # TPU host too, where starting the accelerator backend would only cost time, or fail on a busy chip)
            jax.config.update("jax_platforms", "cpu")
    try:
        cfg = Qwen3Config.from_pretrained(a.config) if a.config else Qwen3Config.preset(a.preset)
        kw = {"ep_buffer_factor": a.ep_buffer_factor or None, "gmm": a.gmm}
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
    except (ValueError, KeyError, OSError) as e:
        return fail(ap.prog, e, 2)
    except Exception as e:  # noqa: BLE001 -- the compiler's own errors (e.g. RESOURCE_EXHAUSTED): one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return fail(ap.prog, f"the program does not compile: {msg[:2000]}", 1)
    rep["preset"] = a.config or a.preset
    print(json.dumps(rep, indent=1, default=float) if a.json else format_report(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
