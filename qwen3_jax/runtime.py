"""Runtime policy of a model, as one explicit config: where it runs and how (mesh, remat, layer loop, MoE
dispatch capacity, kernel overrides). The model's math does not depend on it; `qwen3_jax.kernels.select`
turns it into the algorithm choices for the platform of the mesh's devices.

    rt = Runtime(mesh=make_mesh(expert=8), remat="full")
    model = Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0), runtime=rt)      # or from_pretrained(dir, runtime=rt)
    model.runtime = model.runtime.replace(scan_layers=False)          # a new policy, same parameters
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

REMAT = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class Runtime:
    mesh: Any = None                      # jax.sharding.Mesh the parameters live on (None: one device)
    remat: str = "none"                   # none | full (recompute each layer) | dots (save matmul outputs)
    scan_layers: bool = True              # one compiled layer body (nnx.scan); False unrolls the layers
    # expert parallelism: the ragged dispatch (GPU/TPU) receives at most ep_buffer_factor x the mean routed rows
    # per device and round (None: the worst case, never dropping); training runs one round and drops (counted in
    # dropped_tokens) what does not fit, later choices first, KV-cached inference sends the rest in further rounds.
    ep_buffer_factor: float | None = 1.25
    # fixed per (source, destination) buffers instead (padded dispatch): a training option, KV-cached inference
    # ignores it (never drops). A dropped choice contributes zero; the kept ones keep their weights.
    capacity_factor: float | None = None
    gmm: str = "auto"                     # auto | megablox | ragged_dot | cpu
    attention: str = "auto"               # auto | splash | cudnn | xla | chunked
    ep_dispatch: str = "auto"             # auto | ragged | padded | ragged_emulated
    kv_cache: str = "auto"                # auto | carried | deferred (how a KV-cached forward writes the cache)
    cpu_decode_kernels: bool = True       # allow the XLA:CPU FFI decode kernels where they serve
    routing: Any = None                   # a qwen3_jax.routing.Intervention (top-k, disabled/forced experts, temperature)

    def __post_init__(self):
        if self.remat not in REMAT:
            raise ValueError(f"remat policy {self.remat!r}: choose from {', '.join(REMAT)}")
        for name in ("ep_buffer_factor", "capacity_factor"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be > 0 or None, got {v}")

    def replace(self, **kw) -> "Runtime":
        return dataclasses.replace(self, **kw)

    @functools.cached_property
    def platform(self) -> str:
        from . import kernels

        return kernels.platform_of(self.mesh)

    @functools.cached_property
    def kernels(self):
        from . import kernels

        return kernels.select(self)


FIELDS = tuple(f.name for f in dataclasses.fields(Runtime))
