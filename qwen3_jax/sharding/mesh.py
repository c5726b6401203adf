"""Device mesh with the axes ('data', 'fsdp', 'expert', 'tensor') and multi-host start-up.

    data    pure data parallelism: parameters replicated, batch split
    fsdp    batch split and parameters split (gathered when used: ZeRO-3 / FSDP)
    expert  batch split outside the MoE; inside it, experts split and tokens sent to them by all-to-all
    tensor  attention heads, vocab and expert/MLP widths split (Megatron style)

The innermost axis ('tensor', then 'expert') gets the devices that are closest (same host / ICI ring).
"""

from __future__ import annotations

import math
import warnings

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "expert", "tensor")


def make_mesh(data: int = 1, fsdp: int = 1, expert: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A `Mesh` over `devices` (default: all devices of all processes). One size may be -1: the rest."""
    sizes = {"data": data, "fsdp": fsdp, "expert": expert, "tensor": tensor}
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    free = [a for a, s in sizes.items() if s == -1]
    bad = {a: s for a, s in sizes.items() if not isinstance(s, (int, np.integer)) or (s < 1 and s != -1)}
    if bad:
        raise ValueError(f"make_mesh: axis sizes must be positive integers or -1, got {bad}")
    if len(free) > 1:
        raise ValueError(f"make_mesh: only one axis size may be -1, got -1 for {free}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if n % fixed:
            raise ValueError(f"make_mesh: {n} devices are not divisible by the fixed axis sizes {sizes} (product {fixed})")
        sizes[free[0]] = n // fixed
    if math.prod(sizes.values()) != n:
        raise ValueError(
            f"make_mesh: data*fsdp*expert*tensor = {'*'.join(str(sizes[a]) for a in AXES)} = "
            f"{math.prod(sizes.values())}, but there are {n} devices (use -1 for one axis to take the rest)"
        )
    shape = tuple(sizes[a] for a in AXES)
    try:  # physical-topology-aware order on TPU / GPU (XLA's order elsewhere: CPU devices have no topology)
        arr = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except Exception as e:  # noqa: BLE001  (a subset of a slice's chips, a topology jax does not know)
        # the run still works, but an axis's neighbours may sit far apart on the interconnect: say so and why
        kind = getattr(devices[0], "device_kind", devices[0].platform)
        warnings.warn(
            f"make_mesh: no topology-aware device layout for {', '.join(f'{a}={sizes[a]}' for a in AXES)} over "
            f"{n} {kind} devices ({type(e).__name__}: {' '.join(str(e).split())[:300]}); the devices are placed in "
            "their listed order, so the collectives of an axis may cross more links than needed (give every "
            "device of the slice, or axis sizes that map onto its physical axes)", MeshLayoutWarning, stacklevel=2)
        arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def parse_mesh(text: str) -> dict[str, int]:
    """{axis: size} of a --mesh flag, e.g. "data=4,expert=8" (unnamed axes 1); ValueError naming the flag."""
    sizes = dict.fromkeys(AXES, 1)
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in sizes or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--mesh {text}: expected e.g. data=4,expert=8 with axes {', '.join(AXES)} and sizes >= 1")
        sizes[name] = int(value)
    return sizes


class MeshLayoutWarning(UserWarning):
    """make_mesh could not lay the mesh out on the devices' physical topology (the message says why)."""


AUTO_CLUSTERS = ("gcetpu", "gketpu", "slurm", "ompi")  # jax cluster environments we start from on our own


def detect_cluster() -> str | None:
    """The cluster environment `jax.distributed.initialize()` can configure itself from (a Cloud TPU pod slice
    on GCE or GKE, a SLURM job step run by srun, an Open MPI job), or None (a plain machine: one process)."""
    import os

    try:
        from jax._src.clusters import ClusterEnv
    except ImportError:  # jax moved its registry: the environment variables the common cases set
        if all(v in os.environ for v in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID")):
            return "slurm"
        if "TPU_WORKER_HOSTNAMES" in os.environ or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ:
            return "gketpu"
        return "ompi" if "OMPI_MCA_orte_hnp_uri" in os.environ else None
    for env in ClusterEnv._cluster_types:
        if getattr(env, "name", "") in AUTO_CLUSTERS:
            try:
                if env.is_env_present():
                    return env.name
            except Exception:  # noqa: BLE001  (a probe of the TPU metadata server that fails: not that cluster)
                continue
    return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, **kw) -> tuple[int, int]:
    """Start multi-host JAX (call before anything else touches devices); returns (process_index, count).

    On Cloud TPU pods and SLURM / Open MPI GPU clusters every argument is auto-detected:
    `initialize()` in each process. Elsewhere give the coordinator (process 0's host:port), the number of
    processes and this process's id; with none of them and no cluster detected, nothing is started and the
    run is one process. `num_processes=1` never starts the distributed runtime. CPU processes exchange
    collectives over gloo.
    """
    given = (coordinator_address, num_processes, process_id)
    if num_processes == 1 and process_id in (None, 0):
        return 0, 1
    if all(x is None for x in given) and detect_cluster() is None:
        return 0, 1
    if jax.config.jax_cpu_collectives_implementation in (None, "none", ""):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, **kw)
    return jax.process_index(), jax.process_count()
