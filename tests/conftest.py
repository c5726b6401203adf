"""Test session setup: 8 simulated CPU devices for the multi-device tests (must precede any jax import)."""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import functools  # noqa: E402

import pytest  # noqa: E402


@functools.lru_cache(maxsize=None)
def _reference(name: str, root: str):
    """(transformers model, its save_pretrained directory, our model loaded from it), built once."""
    import qwen3_jax
    from tests.hf_ref import hf_model

    hf = hf_model(name)
    path = os.path.join(root, name)
    hf.save_pretrained(path)
    return hf, path, qwen3_jax.from_pretrained(path)


@pytest.fixture(scope="session")
def ref_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_refs"))


@pytest.fixture(scope="session")
def reference(ref_root):
    """reference(name) -> (hf_model, checkpoint_dir, qwen3_jax model); cached for the session."""
    return lambda name: _reference(name, ref_root)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop every compiled program after each test module. XLA:CPU maps memory for each executable it keeps, and
    the whole suite in one process compiles thousands: past the kernel's vm.max_map_count (65530) an mmap fails
    and the process aborts inside XLA (seen late in the full suite, never in a module alone)."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
