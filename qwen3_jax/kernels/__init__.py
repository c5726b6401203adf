"""The backend seam: every algorithm choice of the model, made in one place from the devices a program is
compiled for.

    ks = kernels.select(runtime)      # Kernels: the choices for the platform of runtime.mesh's devices
    ks.platform                       # "tpu" | "gpu" | "cpu"
    ks.gmm, ks.attention, ks.ep_dispatch, ks.decode_kernels, ks.kv_cache, ks.gather_rows(...), ks.device

The platform is that of the mesh's devices (abstract TPU chips from a topology included), else of the default
device: never `jax.default_backend()`, which says "cpu" while a program is compiled ahead of time for a TPU slice.

| choice                      | tpu                         | gpu                              | cpu                              |
|-----------------------------|-----------------------------|----------------------------------|----------------------------------|
| grouped matmul (experts)    | megablox gmm / tgmm         | tokamax Mosaic GPU (`tokamax`)   | blocked loop per expert (`cpu`)  |
| EP dispatch                 | `ragged_all_to_all`, bounded receive buffers (v5e over 16 chips: padded, capacity = ep_buffer_factor) | same | padded all-to-all (XLA:CPU has no ragged all-to-all) |
| attention, train / prefill  | splash (Pallas, in shard_map) | cuDNN (`jax.nn.dot_product_attention`) | chunked jnp with a flash VJP |
| decode attention            | grouped-head einsum over the cache | same                      | FFI kernel reading the cache in place |
| few-token experts (decode)  | sorted grouped matmul: each routed expert's weights read once | same | FFI kernel / per-row gather |
| KV-cached forward (`kv_cache`) | `carried`: cache written per layer in place | same | `deferred`: written once after the layer loop |
| host malloc tuning          | no                          | no                               | yes (`qwen3_jax.hostmem`)        |

The implementations sit beside this file: `gmm.py` (grouped SwiGLU), `attention.py` (chunked, splash, cuDNN),
`cpu_decode.py` (the XLA:CPU FFI decode kernels). `Runtime` fields override a choice (e.g. gmm="tokamax_triton"
on GPUs before Hopper; gmm="ragged_dot" is XLA's, which XLA:GPU expands densely over the experts).
"""

from __future__ import annotations

import dataclasses
import glob

from typing import Any

import jax
import jax.numpy as jnp

from .gmm import IMPLS as GMM

PLATFORMS = ("cpu", "gpu", "tpu")
_ALIASES = {"cuda": "gpu", "rocm": "gpu"}

ATTENTION = ("splash", "cudnn", "xla", "chunked")
EP_DISPATCH = ("ragged", "padded", "ragged_emulated")
KV_CACHE = ("carried", "deferred")

KERNEL_PLATFORM = {"megablox": "tpu", "splash": "tpu", "tokamax": "gpu", "tokamax_triton": "gpu", "cudnn": "gpu"}

DEFAULTS = {
    "tpu": dict(gmm="megablox", attention="splash", ep_dispatch="ragged", decode_kernels=False, kv_cache="carried"),
    "gpu": dict(gmm="tokamax", attention="cudnn", ep_dispatch="ragged", decode_kernels=False, kv_cache="carried"),
    "cpu": dict(gmm="cpu", attention="chunked", ep_dispatch="padded", decode_kernels=True, kv_cache="deferred"),
}


# Slices whose ICI routing the TPU compiler calls "limited" cannot run ragged_all_to_all (RET_CHECK
# !HasLimitedIci in its emitter). Measured with libtpu 0.0.42.1: v5e 2x2 and 4x4 compile it, 8x8 and 16x16 do
# not; v6e 16x16, v5p and v4 do. Device kind -> most chips of a slice that still compiles it.
RAGGED_A2A_MAX_CHIPS = {"TPU v5 lite": 16, "TPU v5e": 16}


def ragged_all_to_all_compiles(mesh) -> bool:
    """Whether the compiler for the mesh's devices lowers `jax.lax.ragged_all_to_all` (see RAGGED_A2A_MAX_CHIPS)."""
    if mesh is None:
        return True
    limit = RAGGED_A2A_MAX_CHIPS.get(getattr(mesh.devices.flat[0], "device_kind", ""))
    return limit is None or mesh.devices.size <= limit


def normalize_platform(name: str) -> str:
    p = _ALIASES.get(name.lower(), name.lower())
    if p not in PLATFORMS:
        raise ValueError(f"unknown platform {name!r}: choose from {PLATFORMS}")
    return p


def platform_of(mesh=None) -> str:
    """Platform of the devices a program runs on: the mesh's (abstract topology devices too), else the default
    device's."""
    dev = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
    return normalize_platform(dev.platform)


def host_platform() -> str:
    """The platform this process's programs will run on, without starting a backend when none is started yet
    (multi-host start-up must come first): the started backend's, else the accelerator device files present."""
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        return platform_of()
    forced = (jax.config.jax_platforms or "").split(",")[0].strip()
    if forced:
        return normalize_platform(forced)
    return accelerator_present() or "cpu"


def accelerator_present() -> str | None:
    """"tpu" or "gpu" when this machine has the device files of one (whatever jax was told), else None."""
    if glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"):
        return "tpu"
    if glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/kfd"):
        return "gpu"
    return None


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The algorithm choices for one platform (see the module table)."""

    platform: str
    gmm: str
    attention: str
    ep_dispatch: str
    decode_kernels: bool
    # how a KV-cached forward writes the new keys/values (qwen3_jax.model's decoder): "carried", the stacks carried
    # through the layer loop and written per layer in place (the TPU compiler updates a donated cache without a
    # copy: 30B-A3B decode on v5e-8, 64 x 4096 slots, has 0.05 GiB of temporaries, 3.10 GiB "deferred"); or
    # "deferred", the loop only reads the stacks and outputs the new keys/values [L, B, T, K, hd], scattered once
    # after it (XLA:CPU copies carried stacks in every decode step: a token at position ~2000 cost 2-5x)
    kv_cache: str = "carried"
    # capacity factor of a training step's padded dispatch when the runtime gives none: None (the worst case) where
    # the padded dispatch is the platform's own (CPU), ep_buffer_factor where it stands in for the ragged one
    padded_capacity: float | None = None
    # a device of the platform (the mesh's first; None: the default device), for kernels that read the hardware
    device: Any = dataclasses.field(default=None, compare=False)

    @property
    def interpret(self) -> bool:
        """Pallas TPU kernels run in interpret mode when the program is not compiled for a TPU (tests)."""
        return self.platform != "tpu"

    def off_platform(self, kernel: str) -> bool:
        """Whether `kernel` (a grouped matmul or attention choice) runs in a program for another platform than its
        own (tests): megablox and splash in Pallas interpret mode, tokamax through its portable XLA
        implementation."""
        return KERNEL_PLATFORM.get(kernel, self.platform) != self.platform

    def gather_rows(self, num_experts: int, stacked: bool) -> int:
        """Most token copies for which a few-token MoE gathers each copy's expert weights instead of sorting
        (a CPU heuristic: XLA:CPU's gather beats its blocked loop for few rows; 4 layers, 32 experts top-4,
        per decode step: 16 rows gather 2.2 vs blocked 3.2 ms, 32 rows 5.5 vs 4.6 ms). Accelerators always
        sort and run the grouped matmul."""
        if self.platform != "cpu":
            return 0
        return num_experts // 2 if stacked else num_experts

    def attention_for(self, seq_len: int, dtype) -> str:
        """The attention of a call without a cache: the platform's choice, or XLA's where that kernel cannot run
        it (splash tiles the sequence in blocks of 128; cuDNN's fused attention is bf16 / fp16)."""
        if self.attention == "splash" and seq_len % 128:
            return "xla"
        if self.attention == "cudnn" and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
            return "xla"
        return self.attention

    def in_place_moe_rows(self, num_experts: int) -> int:
        """Most token copies for which KV-cached inference runs the XLA:CPU experts kernel, which streams each
        chosen expert's weights from the layer stack once (past 4 x E copies most experts are read anyway and the
        blocked grouped matmul is as fast). 0 where the decode kernels are off."""
        return 4 * num_experts if self.decode_kernels else 0


def select(runtime) -> Kernels:
    """The choices for `runtime` (a qwen3_jax.Runtime): the platform's defaults, overridden by its fields."""
    platform = runtime.platform
    choice = dict(DEFAULTS[platform])
    if runtime.gmm != "auto":
        choice["gmm"] = _check(runtime.gmm, GMM, "gmm")
    if runtime.attention != "auto":
        choice["attention"] = _check(runtime.attention, ATTENTION, "attention")
    if runtime.kv_cache != "auto":
        choice["kv_cache"] = _check(runtime.kv_cache, KV_CACHE, "kv_cache")
    if runtime.ep_dispatch != "auto":
        choice["ep_dispatch"] = _check(runtime.ep_dispatch, EP_DISPATCH, "ep_dispatch")
    elif runtime.capacity_factor is not None:
        choice["ep_dispatch"] = "padded"          # a capacity factor asks for fixed per-pair buffers
    elif choice["ep_dispatch"] == "ragged" and not ragged_all_to_all_compiles(runtime.mesh):
        choice["ep_dispatch"] = "padded"          # e.g. v5e-64 and up: bounded per-pair buffers instead
        choice["padded_capacity"] = runtime.ep_buffer_factor
    if choice["ep_dispatch"].startswith("ragged") and runtime.capacity_factor is not None:
        raise ValueError("capacity_factor is the padded dispatch's; the ragged dispatch bounds its receive "
                         "buffers with ep_buffer_factor")
    choice["decode_kernels"] = choice["decode_kernels"] and runtime.cpu_decode_kernels
    device = runtime.mesh.devices.flat[0] if runtime.mesh is not None else None
    return Kernels(platform=platform, device=device, **choice)


def _check(value, allowed, name):
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: choose from auto, {', '.join(allowed)}")
    return value
