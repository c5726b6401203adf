"""XLA:CPU FFI kernels, compiled from `csrc/` on first use and cached per machine.

KV-cached decode reads, per token, every layer's attention weights and cache row and the chosen experts' weights.
XLA:CPU materialises each of those reads first (a layer scan's dynamic slice of a weight, a gather of experts: a
copy as large as the read); these kernels read them in place from the layer stacks, split the work over XLA's
intra-op threads and compute in fp32 (f32 or bf16 weights and cache):

- `moe_gather_swiglu(x_td, w_tk, e_tk, stack, layer)`: the SwiGLU experts of a few tokens, each distinct
  expert's weights ([L, E, D, F] / [L, E, F, D]) streamed once for all of its tokens;
- `stacked_matmul(x_bmk, w_stack, layer)`: x @ W[layer] (the output projection, the router);
- `stacked_matmul_nt(x_bmk, w_stack, layer)`: x @ W[layer]^T (the q/k/v projections, stored [L, N*hd, D]);
- `decode_attention(q, kn, vn, old_bs, new_b, k_stack, v_stack, layer)`: one new query per row over its cache
  row, reading only the occupied slots.

The shared library is built with the system C++ compiler (`$CXX`, else c++/g++/clang++) against jaxlib's FFI
headers into `$QWEN3_JAX_CACHE` (default ~/.cache/qwen3_jax), keyed by the source, jaxlib version, CPU, compiler
and flags. A machine without a compiler falls back to the XLA path with one warning; QWEN3_JAX_CPU_KERNELS=0 (or
`Runtime(cpu_decode_kernels=False)`) chooses the XLA path silently. They are one optional CPU backend of the
seam in qwen3_jax.kernels: built on first use only, never on other platforms.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

SRC = Path(__file__).parent.parent / "csrc" / "decode_kernels.cc"
# weight dtype -> {kernel: (FFI target, library symbol)}
TARGETS = {
    jnp.dtype(jnp.float32): {"moe": ("qwen3_moe_gather_swiglu_f32", "Qwen3MoeGatherSwigluF32"),
                             "matmul": ("qwen3_stacked_matmul_f32", "Qwen3StackedMatmulF32"),
                             "matmul_nt": ("qwen3_stacked_matmul_nt_f32", "Qwen3StackedMatmulNTF32"),
                             "attention": ("qwen3_decode_attention_f32", "Qwen3DecodeAttentionF32")},
    jnp.dtype(jnp.bfloat16): {"moe": ("qwen3_moe_gather_swiglu_bf16", "Qwen3MoeGatherSwigluBF16"),
                              "matmul": ("qwen3_stacked_matmul_bf16", "Qwen3StackedMatmulBF16"),
                              "matmul_nt": ("qwen3_stacked_matmul_nt_bf16", "Qwen3StackedMatmulNTBF16"),
                              "attention": ("qwen3_decode_attention_bf16", "Qwen3DecodeAttentionBF16")},
}


def cache_dir() -> Path:
    return Path(os.environ.get("QWEN3_JAX_CACHE") or Path.home() / ".cache" / "qwen3_jax")


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def build(verbose: bool = False) -> Path:
    """Path of the compiled library, building it when missing (raises RuntimeError when that fails)."""
    import jaxlib

    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    flags = ["-O3", "-march=native", "-std=c++17", "-fopenmp-simd", "-shared", "-fPIC"]
    key = hashlib.sha256("\n".join([SRC.read_text(), jaxlib.__version__, _cpu_id(), cxx, *flags]).encode())
    out = cache_dir() / f"decode_kernels-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        so = Path(tmp) / out.name
        cmd = [cxx, *flags, f"-I{jax.ffi.include_dir()}", str(SRC), "-o", str(so)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-4000:]}")
        if verbose:
            print(" ".join(cmd))
        os.replace(so, out)  # atomic: concurrent builders (test workers, hosts) each write their own temp file
    return out


@functools.cache
def load() -> bool:
    """Builds (once), loads and registers the kernels; False (with a warning) when they cannot be had."""
    if os.environ.get("QWEN3_JAX_CPU_KERNELS", "1") == "0":
        return False
    try:
        lib = ctypes.CDLL(str(build()))
        for target, symbol in (ts for kernels in TARGETS.values() for ts in kernels.values()):
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except Exception as e:  # noqa: BLE001 -- any failure means: use the XLA path
        warnings.warn(f"qwen3_jax CPU kernels unavailable, decoding takes the XLA path: {e}", stacklevel=2)
        return False
    return True


def available(dtype) -> bool:
    """The kernels serve this weight dtype (and are built: the first call builds them). Whether the program
    runs on XLA:CPU at all is the caller's choice (qwen3_jax.kernels)."""
    return jnp.dtype(dtype) in TARGETS and load()


def _ffi(kernel: str, dtype, out_shape):
    """The FFI call of `kernel` for weights of `dtype`, returning fp32 `out_shape`."""
    if not load():
        raise RuntimeError("qwen3_jax CPU kernels unavailable (see the warning); use the XLA path")
    target, _ = TARGETS[jnp.dtype(dtype)][kernel]
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(out_shape, jnp.float32), vmap_method="sequential")


def moe_gather_swiglu(x_td, w_tk, e_tk, stack, layer):
    """y_td [T, D] fp32 = sum_j w_tk[t, j] * SwiGLU expert e_tk[t, j] of layer `layer` applied to x_td[t].
    stack = (gate [L, E, D, F], up [L, E, D, F], down [L, E, F, D]), all of one dtype in TARGETS."""
    gate, up, down = stack
    call = _ffi("moe", gate.dtype, x_td.shape)
    return call(x_td.astype(jnp.float32), w_tk.astype(jnp.float32), e_tk.astype(jnp.int32),
                jnp.asarray(layer, jnp.int32), gate, up.astype(gate.dtype), down.astype(gate.dtype))


def stacked_matmul(x_bmk, w_stack, layer):
    """y [B, M, N] fp32 = x_bmk[b] @ W[layer, b], read in place from w_stack [L, Bw, K, N]; Bw = 1 (one matrix
    for every b) or B."""
    call = _ffi("matmul", w_stack.dtype, (*x_bmk.shape[:2], w_stack.shape[3]))
    return call(x_bmk.astype(jnp.float32), jnp.asarray(layer, jnp.int32), w_stack)


def stacked_matmul_nt(x_bmk, w_stack, layer):
    """y [B, M, N] fp32 = x_bmk[b] @ W[layer]^T, read in place from w_stack [L, N, K] (output-major: the q/k/v
    projections)."""
    call = _ffi("matmul_nt", w_stack.dtype, (*x_bmk.shape[:2], w_stack.shape[1]))
    return call(x_bmk.astype(jnp.float32), jnp.asarray(layer, jnp.int32), w_stack)


def decode_attention(q_bhd, kn_bkd, vn_bkd, old_bs, new_b, k_stack, v_stack, layer):
    """o [B, H, hd] fp32: each row's query (1/sqrt(hd) scaled here) over the cache slots old_bs [B, S] marks in
    layer `layer` of k_stack/v_stack [L, B, S, K, hd] and, where new_b [B], its own new key/value kn/vn [B, K, hd];
    grouped-query (H = K * G), fp32 softmax; a row with nothing to attend to gets zeros."""
    call = _ffi("attention", k_stack.dtype, q_bhd.shape)
    f32 = jnp.float32
    return call(q_bhd.astype(f32), kn_bkd.astype(f32), vn_bkd.astype(f32), old_bs.astype(bool), new_b.astype(bool),
                jnp.asarray(layer, jnp.int32), k_stack, v_stack.astype(k_stack.dtype))


# ============================================================================ the model's calls
# KV-cached inference on CPU reads layer l's weights and cache rows in place from their layer stacks through the
# kernels above: in a layer scan, XLA copies every slice it feeds to a matmul (a decode step of the bench config
# copied ~1 MB per layer) and a gather of the chosen experts copies them whole. Inference only (no gradients); the
# model's XLA functions (qwen3_jax.model.cached_attention, qwen3_jax.moe.moe_experts_gather) are the reference the
# tests hold them to.
def stacked_proj(x, w_stack, layer, n_in: int = 1):
    """x [..., *in] @ w_stack[layer] for w_stack [L, *in, *out] (n_in input dims) -> [..., *out] fp32."""
    lead, k = x.shape[: x.ndim - n_in], math.prod(x.shape[x.ndim - n_in:])
    out = w_stack.shape[1 + n_in:]
    y = stacked_matmul(x.reshape(1, -1, k), w_stack.reshape(w_stack.shape[0], 1, k, -1), layer)
    return y.reshape(*lead, *out)


def stacked_head_proj(x, w_stack, layer):
    """x [..., D] by w_stack[layer] for an output-major w_stack [L, N, hd, D] -> [..., N, hd] fp32."""
    n_l, n, hd, d = w_stack.shape
    y = stacked_matmul_nt(x.reshape(1, -1, d), w_stack.reshape(n_l, n * hd, d), layer)
    return y.reshape(*x.shape[:-1], n, hd)


def moe_experts_kernel(x_td, w_tk, e_tk, stacked):
    """moe_experts_gather of layer stacked[1], the chosen experts read in place from the stack stacked[0]
    (slots naming no expert -- padding -- get weight 0)."""
    stack = tuple(stacked[0][n] for n in ("gate_proj", "up_proj", "down_proj"))
    n_exp = stack[0].shape[1]
    w_tk = jnp.where(e_tk < n_exp, w_tk, 0)
    e_tk = jnp.minimum(e_tk, n_exp - 1)
    return moe_gather_swiglu(x_td, w_tk, e_tk, stack, stacked[1]).astype(x_td.dtype)


def cached_attention_kernel(q_bthd, k_stack, v_stack, layer, kn_btkd, vn_btkd, old_bs, new_btt):
    """cached_attention for T == 1 with layer `layer` of the cache k_stack/v_stack [L, B, S, K, hd] read in place
    (only the slots old_bs marks)."""
    o_bhd = decode_attention(q_bthd[:, 0], kn_btkd[:, 0], vn_btkd[:, 0], old_bs, new_btt[:, 0, 0],
                                        k_stack, v_stack, layer)
    return o_bhd[:, None].astype(q_bthd.dtype)


