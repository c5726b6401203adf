"""XLA:CPU decode kernels (qwen3_jax.kernels.cpu_decode): built here, equal to the XLA functions they replace (at
extreme pre-activations too), used by KV-cached decode with the same tokens as the XLA path; without a compiler the
model falls back to XLA. On a machine without a C++ compiler the kernel tests are reported as skipped for that
reason (the fallback test still runs)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3_jax.kernels import cpu_decode as cpu_kernels
from qwen3_jax.kernels.cpu_decode import cached_attention_kernel
from qwen3_jax.model import KVCache, cached_attention
from qwen3_jax.moe import moe_experts_gather

DTYPES = [jnp.float32, jnp.bfloat16]
needs_compiler = pytest.mark.skipif(
    not (cpu_kernels._compiler()), reason="no C++ compiler here: the CPU decode kernels cannot be built (decoding "
    "takes the XLA path); install g++ to test them")


@needs_compiler
def test_kernels_build_and_load():
    """A machine with a C++ compiler builds the kernels (else every decode silently takes the XLA path)."""
    assert cpu_kernels.load()
    assert cpu_kernels.available(jnp.float32) and cpu_kernels.available(jnp.bfloat16)
    assert not cpu_kernels.available(jnp.float16)


@needs_compiler
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, bw, m, k, n", [(1, 1, 1, 256, 256), (3, 1, 5, 40, 37), (2, 2, 4, 128, 300)])
def test_stacked_matmul_equals_einsum(dtype, b, bw, m, k, n):
    rng = np.random.default_rng(0)
    n_layers = 3
    x = jnp.asarray(rng.normal(size=(b, m, k)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(n_layers, bw, k, n)), dtype)
    fn = jax.jit(cpu_kernels.stacked_matmul)
    for layer in range(n_layers):
        w_l = jnp.broadcast_to(w[layer].astype(jnp.float32), (b, k, n))
        ref = jnp.einsum("bmk,bkn->bmn", x, w_l, precision=jax.lax.Precision.HIGHEST)
        out = fn(x, w, layer)
        assert out.dtype == jnp.float32 and out.shape == (b, m, n)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-4)


@needs_compiler
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, s, kh, g, hd", [(4, 16, 2, 2, 12), (1, 300, 4, 8, 64)])
def test_decode_attention_equals_cached_attention(dtype, b, s, kh, g, hd):
    """Ragged rows (lengths 0..S), a padding row whose new token is not real (nothing to attend: zeros), every
    layer of the stack; the XLA function reads the same (rounded) cache."""
    rng = np.random.default_rng(4)
    n_layers = 2
    k_stack = jnp.asarray(rng.normal(size=(n_layers, b, s, kh, hd)), dtype)
    v_stack = jnp.asarray(rng.normal(size=(n_layers, b, s, kh, hd)), dtype)
    q = jnp.asarray(rng.normal(size=(b, 1, kh * g, hd)), jnp.float32)
    kn, vn = (jnp.asarray(rng.normal(size=(b, 1, kh, hd)), jnp.float32) for _ in range(2))
    lengths = rng.integers(0, s + 1, b)
    lengths[0] = 0
    old_bs = jnp.asarray(np.arange(s)[None] < lengths[:, None])
    new_btt = jnp.asarray(np.arange(b) != 0)[:, None, None] if b > 1 else jnp.ones((1, 1, 1), bool)
    write_bt = jnp.asarray(lengths[:, None], jnp.int32)
    fn = jax.jit(lambda *a: cached_attention_kernel(*a))
    for layer in range(n_layers):
        ref = cached_attention(q, k_stack[layer].astype(jnp.float32), v_stack[layer].astype(jnp.float32), kn, vn,
                               write_bt, old_bs, new_btt)
        out = fn(q, k_stack, v_stack, layer, kn, vn, old_bs, new_btt)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
    if b > 1:
        assert not np.any(np.asarray(out[0]))


@needs_compiler
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t, d, f, e, k", [(1, 256, 256, 32, 4), (3, 40, 28, 12, 4), (17, 64, 96, 8, 2)])
def test_moe_gather_swiglu_equals_xla_gather(dtype, t, d, f, e, k):
    """Every layer of the stack; tokens sharing experts (17 tokens over 8 experts); widths not multiples of 8."""
    rng = np.random.default_rng(1)
    n_layers = 2
    stack = tuple(jnp.asarray(rng.normal(size=s) * 0.2, dtype)
                  for s in [(n_layers, e, d, f), (n_layers, e, d, f), (n_layers, e, f, d)])
    x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
    e_tk = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(t)]), jnp.int32)
    w_tk = jax.nn.softmax(jnp.asarray(rng.normal(size=(t, k)), jnp.float32), -1)
    fn = jax.jit(cpu_kernels.moe_gather_swiglu)
    for layer in range(n_layers):
        p = {n: s[layer].astype(jnp.float32) for n, s in zip(("gate_proj", "up_proj", "down_proj"), stack)}
        with jax.default_matmul_precision("highest"):
            ref = moe_experts_gather(x, w_tk, e_tk, p)
        np.testing.assert_allclose(np.asarray(fn(x, w_tk, e_tk, stack, layer)), np.asarray(ref), rtol=1e-5, atol=1e-4)


@needs_compiler
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, m, k, n", [(1, 1, 256, 256), (3, 5, 40, 37), (2, 4, 130, 300), (1, 9, 15, 8)])
def test_stacked_matmul_nt_equals_einsum(dtype, b, m, k, n):
    """x @ W[l]^T for output-major weights [L, N, K] (the q/k/v projections): K not a multiple of the 16 lanes,
    row counts past the 4-row blocks."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(b, m, k)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, n, k)), dtype)
    fn = jax.jit(cpu_kernels.stacked_matmul_nt)
    for layer in range(3):
        ref = jnp.einsum("bmk,nk->bmn", x, w[layer].astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        out = fn(x, w, layer)
        assert out.dtype == jnp.float32 and out.shape == (b, m, n)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-4)


@needs_compiler
@pytest.mark.parametrize("cache_dtype", [jnp.float32, jnp.bfloat16])
def test_decode_with_kernels_equals_xla_decode(reference, cache_dtype):
    """Model level: prefill then single-token steps over the cache, kernels on (default) vs off: same logits, and
    the kernels path is the one taken (its jaxpr has the FFI calls)."""
    _, _, model = reference("moe_uniform")
    cfg = model.config
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 9)).astype(np.int32)

    def run(use):
        model.runtime = model.runtime.replace(cpu_decode_kernels=use)
        try:
            cache = KVCache.init(cfg, 2, 16, cache_dtype)
            out = model(jnp.asarray(ids[:, :6]), cache=cache)
            logits = [out.logits[:, -1]]
            for i in range(6, 9):
                out = model(jnp.asarray(ids[:, i:i + 1]), cache=out.cache)
                logits.append(out.logits[:, 0])
            jaxpr = str(jax.make_jaxpr(lambda c: model(jnp.asarray(ids[:, :1]), cache=c).logits)(out.cache))
            return np.asarray(jnp.stack(logits)), jaxpr
        finally:
            model.runtime = model.runtime.replace(cpu_decode_kernels=True)

    with_k, jaxpr_k = run(True)
    without, jaxpr_x = run(False)
    assert all(f"qwen3_{name}" in jaxpr_k for name in ("stacked_matmul", "stacked_matmul_nt", "moe_gather_swiglu",
                                                                    "decode_attention"))
    assert "qwen3_" not in jaxpr_x
    np.testing.assert_allclose(with_k, without, rtol=1e-4, atol=2e-4 if cache_dtype == jnp.float32 else 2e-2)


@needs_compiler
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_at_extreme_pre_activations(dtype):
    """SwiGLU at gate/up pre-activations of +-88.8, +-90, +-100, +-1e4 (exp overflows past 88.7: silu(-90) must be
    ~0, not -90) and attention scores 1e4 apart equal the XLA functions."""
    vals = np.array([100.0, -100.0, 1e4, -1e4, 90.0, -90.0, 88.8, -88.8], np.float32)
    d = len(vals)
    eye = np.eye(d, dtype=np.float32)
    stack = tuple(jnp.asarray(np.stack([eye, 2 * eye])[:, None], dtype) for _ in range(3))   # [L=2, E=1, 8, 8]
    x = jnp.asarray(vals[None])
    w_tk, e_tk = jnp.ones((1, 1), jnp.float32), jnp.zeros((1, 1), jnp.int32)
    for layer in range(2):
        p = {n: s[layer].astype(jnp.float32) for n, s in zip(("gate_proj", "up_proj", "down_proj"), stack)}
        with jax.default_matmul_precision("highest"):
            ref = np.asarray(moe_experts_gather(x, w_tk, e_tk, p))
        out = np.asarray(jax.jit(cpu_kernels.moe_gather_swiglu)(x, w_tk, e_tk, stack, layer))
        assert np.isfinite(out).all()
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-30)
    # attention: one slot's score 1e4 above the others, and a row where the new token wins by 1e4
    b, s_len, kh, hd = 2, 8, 1, 4
    k_stack = np.zeros((1, b, s_len, kh, hd), np.float32)
    k_stack[0, 0, 3, 0, 0] = 1.0
    v_stack = np.asarray(np.random.default_rng(0).normal(size=(1, b, s_len, kh, hd)), np.float32)
    q = np.zeros((b, 1, kh, hd), np.float32)
    q[:, 0, 0, 0] = 2e4                                   # scaled by 1/sqrt(4): scores 1e4 vs 0
    kn = np.zeros((b, 1, kh, hd), np.float32)
    kn[1, 0, 0, 0] = 3.0                                  # row 1: the new key wins
    vn = np.ones((b, 1, kh, hd), np.float32)
    old_bs = jnp.ones((b, s_len), bool)
    new_btt = jnp.ones((b, 1, 1), bool)
    args = (jnp.asarray(q), jnp.asarray(k_stack, dtype), jnp.asarray(v_stack, dtype), 0, jnp.asarray(kn),
            jnp.asarray(vn), old_bs, new_btt)
    out = np.asarray(cached_attention_kernel(*args))
    ref = np.asarray(cached_attention(jnp.asarray(q), jnp.asarray(k_stack[0], dtype).astype(jnp.float32),
                                      jnp.asarray(v_stack[0], dtype).astype(jnp.float32), jnp.asarray(kn),
                                      jnp.asarray(vn), jnp.zeros((b, 1), jnp.int32), old_bs, new_btt))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_no_compiler_falls_back_to_xla(monkeypatch, tmp_path):
    """Without a compiler (and nothing cached) load() warns once and says False; available() then keeps the
    model on the XLA path."""
    monkeypatch.setenv("QWEN3_JAX_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: None)
    cpu_kernels.load.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not cpu_kernels.available(jnp.float32)
            assert not cpu_kernels.available(jnp.float32)
        assert len(caught) == 1 and "no C++ compiler" in str(caught[0].message)
        with pytest.raises(RuntimeError, match="unavailable"):
            cpu_kernels.moe_gather_swiglu(jnp.zeros((1, 4)), jnp.ones((1, 1)), jnp.zeros((1, 1), jnp.int32),
                                          (jnp.zeros((1, 2, 4, 4)),) * 3, 0)
    finally:
        monkeypatch.undo()
        cpu_kernels.load.cache_clear()
    assert cpu_kernels.load()  # the real cache again


@pytest.mark.parametrize("kernels", [pytest.param(True, marks=needs_compiler), False])
def test_cpu_decode_step_copies_no_cache_stack(reference, kernels):
    """The engine's compiled decode step on CPU (the platform's KV-cache strategy, "deferred") updates the donated
    cache without copying a cache stack: with the stacks carried through the layer loop, XLA:CPU copied them in
    every step, which made a token at position ~2000 cost 5x (bench/decode.py)."""
    import re

    from flax import nnx

    from qwen3_jax.infer.engine import Engine

    _, _, model = reference("moe_uniform")
    model = nnx.merge(*nnx.split(model))
    model.runtime = model.runtime.replace(cpu_decode_kernels=kernels)
    assert model.runtime.kernels.kv_cache == "deferred"
    cfg = model.config
    eng = Engine(model, chunk=4)
    slots = eng.new_slots(2, 64, 16)
    hlo = eng.fns.decode.lower(eng.params, slots, np.int32(4), np.bool_(False), n_max=4).compile().as_text()
    stack = f"[{cfg.num_hidden_layers},2,64,{cfg.num_key_value_heads},{cfg.head_dim}]"
    copies = [ln.strip() for ln in hlo.splitlines() if re.search(r"\bcopy\(", ln) and stack in ln]
    assert not copies, "\n".join(copies)
