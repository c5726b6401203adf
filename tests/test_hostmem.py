"""qwen3_jax.hostmem: the glibc malloc settings our programs apply (checked in a fresh process)."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings are Linux-only")

PROBE = """
import ctypes, resource
from qwen3_jax.hostmem import tune_malloc
print(tune_malloc())
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def use(n=64 << 20):                         # like XLA:CPU's per-run temporaries: malloc, touch, free
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)

use()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    use()                                    # 64 MB: glibc by default maps and unmaps it every time
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(env_value=None):
    env = dict(os.environ)
    env.pop("QWEN3_JAX_MALLOC", None)
    if env_value:
        env["QWEN3_JAX_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, env=env).stdout.split()
    return out[0] == "True", int(out[1])


def test_tune_malloc_keeps_large_buffers_mapped():
    tuned, faults = _probe()
    default, faults_default = _probe("system")
    assert tuned and not default
    pages = 5 * (64 << 20) // 4096
    assert faults_default > pages // 2          # every 64 MB buffer faulted afresh
    assert faults < pages // 20                 # reused


def test_malloc_tuning_is_a_cpu_heuristic():
    """On a host whose programs run on an accelerator nothing is changed (checked in a fresh process)."""
    code = "from qwen3_jax.hostmem import tune_malloc; print(tune_malloc('tpu'), tune_malloc('gpu'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
