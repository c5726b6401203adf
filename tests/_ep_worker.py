"""One process of the two-process expert-parallel test (run by tests/test_sharding.py, not by pytest).

    python tests/_ep_worker.py PROCESS_ID PORT CHECKPOINT_DIR

Two CPU devices per process, one mesh over the four: expert=4 spans both processes, so the MoE's
all-to-all crosses the process boundary (gloo). Prints one JSON line with the errors against the
single-device model computed in this process.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

from qwen3_jax.sharding import initialize  # noqa: E402

pid, port, ckpt = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid, initialization_timeout=60)

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import qwen3_jax  # noqa: E402
from qwen3_jax.sharding import make_mesh, param_shardings  # noqa: E402

mesh = make_mesh(expert=4)
ids = np.random.default_rng(0).integers(0, 128, (4, 6)).astype(np.int32)

ref_model = qwen3_jax.from_pretrained(ckpt)  # this process's own copy, one local device
ref = np.asarray(ref_model(ids).logits)

model = qwen3_jax.from_pretrained(ckpt, mesh=mesh)  # every tensor straight into its (global) shards
shardings = param_shardings(model.config, mesh)
placed_ok = all(v.get_value().sharding.is_equivalent_to(shardings[tuple(p)], v.get_value().ndim)
                for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
local_experts = model.layers.moe.gate_proj[...].addressable_shards[0].data.shape[1]
replicated = NamedSharding(mesh, P())
graphdef, state = nnx.split(model)
fwd = jax.jit(lambda s, x: jax.lax.with_sharding_constraint(nnx.merge(graphdef, s)(x).logits, replicated))
compiled = fwd.lower(state, ids).compile()
ep = np.asarray(compiled(state, ids).addressable_shards[0].data)
print(json.dumps({
    "process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
    "local_devices": jax.local_device_count(), "err": float(np.abs(ep - ref).max()), "placed_ok": placed_ok,
    "local_experts": int(local_experts), "all_to_all": "all-to-all" in compiled.as_text(),
}), flush=True)
jax.distributed.shutdown()
