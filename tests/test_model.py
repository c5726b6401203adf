"""Numerical parity with transformers' Qwen3MoeForCausalLM / Qwen3ForCausalLM on small random configs."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import qwen3_jax
from qwen3_jax import Qwen3Config, Qwen3ForCausalLM, Runtime
from qwen3_jax.kernels.gmm import grouped_swiglu
from tests.hf_ref import CONFIGS, hf_forward

NAMES = list(CONFIGS)


def _ids(cfg, b, t, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t)).astype(np.int32)


@pytest.mark.parametrize("name", NAMES)
def test_fp32_logits_and_router_logits_match_transformers(reference, name):
    hf, _, model = reference(name)
    ids = _ids(model.config, 3, 17)
    ref_logits, ref_router = hf_forward(hf, ids)
    out = model(jnp.asarray(ids))
    assert out.logits.shape == ref_logits.shape
    np.testing.assert_allclose(np.asarray(out.logits), ref_logits, atol=1e-4, rtol=0)
    if model.config.is_moe:
        assert out.router_logits.shape == ref_router.shape  # [L_moe, B, T, E]
        np.testing.assert_allclose(np.asarray(out.router_logits), ref_router, atol=1e-4, rtol=0)
    else:
        assert out.router_logits is None


@pytest.mark.parametrize("name", ["moe_mixed_yarn_tied", "moe_uniform", "dense_yarn"])
def test_left_padded_batch_equals_unpadded_rows(reference, name):
    hf, _, model = reference(name)
    cfg = model.config
    ids = _ids(cfg, 2, 12, seed=1)
    pad = 5
    padded = np.concatenate([np.zeros((2, pad), np.int32), ids], axis=1)
    mask = np.ones_like(padded)
    mask[0, :pad] = 0  # row 0 left-padded, row 1 has 5 more real tokens in front
    padded[1, :pad] = _ids(cfg, 1, pad, seed=2)[0]
    out = model(jnp.asarray(padded), attention_mask=jnp.asarray(mask))
    alone = model(jnp.asarray(ids[:1]))
    np.testing.assert_allclose(np.asarray(out.logits[0, pad:]), np.asarray(alone.logits[0]), atol=1e-4, rtol=0)
    # row 1 (no padding) equals transformers on the full row
    ref_logits, _ = hf_forward(hf, padded[1:])
    np.testing.assert_allclose(np.asarray(out.logits[1]), ref_logits[0], atol=1e-4, rtol=0)
    # and the padded batch equals transformers given the same mask and positions
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    ref_pad, _ = hf_forward(hf, padded, attention_mask=mask, position_ids=pos)
    np.testing.assert_allclose(np.asarray(out.logits[0, pad:]), ref_pad[0, pad:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["moe_mixed_yarn_tied", "moe_uniform", "dense_yarn"])
def test_bf16_close_to_fp32_reference(reference, name):
    hf, path, _ = reference(name)
    model = qwen3_jax.from_pretrained(path, dtype="bfloat16")
    assert model.embed_tokens[...].dtype == jnp.bfloat16
    ids = _ids(model.config, 2, 16, seed=3)
    ref_logits, _ = hf_forward(hf, ids)
    logits = np.asarray(model(jnp.asarray(ids)).logits.astype(jnp.float32))
    err = np.abs(logits - ref_logits).mean() / np.abs(ref_logits).mean()
    # transformers itself in bf16 is the yardstick: we may not be much further from fp32 than it is
    hf16 = copy.deepcopy(hf).to(torch.bfloat16)
    if model.config.is_moe:  # torch's CPU grouped_mm wants 16-byte strides, our odd test sizes have none
        hf16.set_experts_implementation("eager")
    hf_logits16, _ = hf_forward(hf16, ids)
    hf_err = np.abs(hf_logits16 - ref_logits).mean() / np.abs(ref_logits).mean()
    assert err < max(1.5 * hf_err, 0.01), (err, hf_err)


def test_gradients_match_torch_autograd(reference):
    """The grouped matmul's custom VJP, routing and attention backprop like torch autograd."""
    hf, _, model = reference("moe_uniform")
    ids = _ids(model.config, 2, 9, seed=4)
    proj = np.random.default_rng(5).normal(size=(2, 9, model.config.vocab_size)).astype(np.float32)

    hf.zero_grad()
    (hf(torch.tensor(ids)).logits * torch.tensor(proj)).sum().backward()

    def loss(m):
        return jnp.sum(m(jnp.asarray(ids)).logits * proj)

    grads = nnx.grad(loss)(model)
    g_experts = np.asarray(grads.layers.moe.gate_proj[...])           # [Lm, E, D, F]
    t_experts = hf.model.layers[1].mlp.experts.gate_up_proj.grad.numpy()  # [E, 2F, D], gate rows first
    f = model.config.moe_intermediate_size
    np.testing.assert_allclose(g_experts[1], t_experts[:, :f, :].transpose(0, 2, 1), atol=2e-4, rtol=1e-3)
    g_down = np.asarray(grads.layers.moe.down_proj[...])[2]
    t_down = hf.model.layers[2].mlp.experts.down_proj.grad.numpy().transpose(0, 2, 1)
    np.testing.assert_allclose(g_down, t_down, atol=2e-4, rtol=1e-3)
    g_q = np.asarray(grads.layers.attn.q_proj[...])[0]                # [H, hd, D]
    t_q = hf.model.layers[0].self_attn.q_proj.weight.grad.numpy()     # [H*hd, D]
    np.testing.assert_allclose(g_q.reshape(-1, g_q.shape[-1]), t_q, atol=2e-4, rtol=1e-3)
    g_emb = np.asarray(grads.embed_tokens[...])
    np.testing.assert_allclose(g_emb, hf.model.embed_tokens.weight.grad.numpy(), atol=2e-4, rtol=1e-3)


def test_random_init_dtypes_and_call_contract():
    cfg = Qwen3Config.from_dict(dict(CONFIGS["moe_uniform"], model_type="qwen3_moe"))
    m = Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert m.layers.moe.gate_proj[...].dtype == jnp.float32
    out = m(jnp.ones((2, 5), jnp.int32))
    assert out.logits.shape == (2, 5, cfg.vocab_size) and out.logits.dtype == jnp.bfloat16
    assert out.router_logits.shape == (cfg.num_hidden_layers, 2, 5, cfg.num_experts)
    assert out.router_logits.dtype == jnp.float32
    m16 = Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert m16.layers.attn.q_proj[...].dtype == jnp.bfloat16


def test_layer_stack_is_scanned_not_unrolled():
    """One compiled layer body: the HLO has a while loop and its size does not grow with depth."""
    base = Qwen3Config.from_dict(dict(CONFIGS["moe_uniform"], model_type="qwen3_moe"))
    sizes = []
    for layers in (2, 8):
        cfg = base.replace(num_hidden_layers=layers)
        graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0))))
        fwd = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids).logits)
        hlo = fwd.lower(state, jax.ShapeDtypeStruct((1, 8), jnp.int32)).as_text()
        assert "while" in hlo
        sizes.append(len(hlo))
    assert abs(sizes[1] - sizes[0]) < 0.02 * sizes[0]


def _swiglu_reference(x, ws, sizes):
    """Row by row: the SwiGLU of the row's group; rows past the groups are zero."""
    ends = np.cumsum(np.asarray(sizes))
    g_of = np.searchsorted(ends, np.arange(x.shape[0]), side="right")
    rows = []
    for r, g in enumerate(g_of):
        if g >= len(ends):
            rows.append(jnp.zeros_like(x[r]))
            continue
        h = jax.nn.silu(x[r] @ ws[0][g]) * (x[r] @ ws[1][g])
        rows.append(h @ ws[2][g])
    return jnp.stack(rows)


@pytest.mark.parametrize("impl,tile", [("cpu", 16), ("cpu", 32), ("cpu", 128), ("megablox", None),
                                       ("tokamax", None), ("tokamax_triton", None), ("ragged_dot", None)])
def test_grouped_swiglu_implementations_equal_the_reference(impl, tile):
    """Every grouped matmul of qwen3_jax.kernels (the CPU loop with its full + quarter tail tiles, megablox in
    interpret mode, tokamax's API and backward with its portable implementation, ragged_dot): values and gradients
    equal a row-by-row reference; rows past the groups give zeros and receive no gradient. (The GPU kernels
    themselves: bench/gpu.py --check on a GPU.)"""
    rng = np.random.default_rng(tile or 7)
    m, d, f, e = 203, 24, 16, 7
    sizes = rng.multinomial(m - 5, [0.4, 0.05, 0.0, 0.2, 0.05, 0.1, 0.2])  # one empty group, 5 unrouted rows
    sizes = jnp.asarray(sizes, jnp.int32)
    x = jnp.asarray(rng.normal(size=(m, d)), jnp.float32)
    ws = [jnp.asarray(rng.normal(size=s) * 0.5, jnp.float32) for s in [(e, d, f), (e, d, f), (e, f, d)]]
    new = lambda x, *w: grouped_swiglu(x, *w, sizes, impl=impl, interpret=True, tile=tile)  # noqa: E731
    ref = lambda x, *w: _swiglu_reference(x, w, sizes)  # noqa: E731
    out = new(x, *ws)
    np.testing.assert_allclose(out, ref(x, *ws), rtol=1e-5, atol=1e-4)
    assert not np.asarray(out[m - 5:]).any()
    proj = jnp.asarray(rng.normal(size=(m, d)), jnp.float32)

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a) * proj)

    got, want = jax.grad(loss(new), (0, 1, 2, 3))(x, *ws), jax.grad(loss(ref), (0, 1, 2, 3))(x, *ws)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))
    assert not np.asarray(got[0][m - 5:]).any()


def test_attention_implementations_equal_masked_softmax():
    """chunked (CPU), XLA (GPU's fallback, the cuDNN call's arguments) and splash (TPU, Pallas interpret mode):
    causal attention with packed segments and left padding equals a plain masked softmax, values and gradients."""
    from qwen3_jax.kernels import attention as A
    from qwen3_jax.kernels import Kernels

    rng = np.random.default_rng(0)
    b, t, h, k, hd = 2, 128, 4, 2, 16
    q = jnp.asarray(rng.normal(size=(b, t, h, hd)), jnp.float32)
    kk, v = (jnp.asarray(rng.normal(size=(b, t, k, hd)), jnp.float32) for _ in range(2))
    seg = np.repeat([[1] * 50 + [2] * 78], b, 0)
    seg[0, :3] = 0                                                          # row 0 left-padded
    seg = jnp.asarray(seg, jnp.int32)
    mask = A.segment_mask(seg, t, b)

    def reference(q, kk, v):
        g = h // k
        s = jnp.einsum("bthd,bshd->bhts", q, jnp.repeat(kk, g, 2)) / np.sqrt(hd)
        s = jnp.where(mask[:, None], s, -1e30)
        return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, -1), jnp.repeat(v, g, 2))

    proj = jnp.asarray(rng.normal(size=(b, t, h, hd)), jnp.float32)
    loss = lambda fn: (lambda *a: jnp.sum(fn(*a) * proj))  # noqa: E731
    want = reference(q, kk, v)
    want_g = jax.grad(loss(reference), (0, 1, 2))(q, kk, v)
    for impl in ("chunked", "xla", "splash"):
        ks = Kernels(platform="cpu", gmm="cpu", attention=impl, ep_dispatch="padded", decode_kernels=False)
        fn = lambda q, kk, v: A.attention(q, kk, v, seg, ks=ks)  # noqa: E731
        np.testing.assert_allclose(fn(q, kk, v), want, atol=2e-5, err_msg=impl)
        for a, w in zip(jax.grad(loss(fn), (0, 1, 2))(q, kk, v), want_g):
            np.testing.assert_allclose(a, w, atol=5e-5, err_msg=impl)
    # the chunked kernel's own chunking (5-row chunks, odd length)
    got = A.causal_attention(q[:, :23], kk[:, :23], v[:, :23], A.segment_mask(seg[:, :23], 23, b), chunk=5)
    full = A.causal_attention(q[:, :23], kk[:, :23], v[:, :23], A.segment_mask(seg[:, :23], 23, b), chunk=23)
    np.testing.assert_allclose(got, full, atol=1e-6)


def test_swiglu_reading_the_layer_stack_equals_the_layer_slice():
    """Inside a layer scan the CPU kernel may read the experts from the whole stack (no per-layer copy): same values
    and gradients as the scan's slice, and the compiled forward keeps no full-layer slice of the experts."""
    rng = np.random.default_rng(3)
    n_layers, m, d, f, e = 3, 150, 16, 24, 5
    ws = [jnp.asarray(rng.normal(size=(n_layers, *s)) * 0.3, jnp.float32) for s in [(e, d, f), (e, d, f), (e, f, d)]]
    x = jnp.asarray(rng.normal(size=(m, d)), jnp.float32)
    sizes = jnp.asarray([40, 0, 61, 30, 14], jnp.int32)  # one empty expert, 5 unrouted rows

    def run(stacked):
        def loss(x, ws):
            def body(h, xs):
                layer, w_l = xs
                y = grouped_swiglu(h, *w_l, sizes, impl="cpu", tile=32,
                                   stacked=(ws, layer) if stacked else None)
                return jnp.tanh(y), None

            h, _ = jax.lax.scan(body, x, (jnp.arange(n_layers), tuple(ws)))
            return jnp.sum(h * x)
        return loss

    np.testing.assert_allclose(run(True)(x, ws), run(False)(x, ws), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.grad(run(True), (0, 1))(x, ws)), jax.tree.leaves(jax.grad(run(False), (0, 1))(x, ws))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))
    hlo = jax.jit(run(True)).lower(x, ws).compile().as_text()
    full_layer = f"f32[{e},{d},{f}]"
    assert not [ln for ln in hlo.splitlines() if "dynamic-slice" in ln and ln.split("=")[1].strip().startswith(full_layer)]


def test_few_rows_read_the_layer_stack_once_per_distinct_expert():
    """Decode-sized batches: with the layer stack the CPU kernel copies one expert per distinct expert, empty
    experts skipped, and equals the per-row reference."""
    rng = np.random.default_rng(5)
    n_layers, d, f, e = 2, 16, 24, 8
    ws = [jnp.asarray(rng.normal(size=(n_layers, *s)) * 0.3, jnp.float32) for s in [(e, d, f), (e, d, f), (e, f, d)]]
    x = jnp.asarray(rng.normal(size=(12, d)), jnp.float32)
    sizes = jnp.asarray([3, 0, 0, 5, 0, 2, 0, 0], jnp.int32)   # 10 routed rows, 2 unrouted
    layer = 1
    w_l = [w[layer] for w in ws]
    kernel = jax.jit(lambda x: grouped_swiglu(x, *w_l, sizes, impl="cpu", stacked=(ws, jnp.int32(layer))))
    np.testing.assert_allclose(kernel(x), _swiglu_reference(x, w_l, sizes), rtol=1e-5, atol=1e-6)
    assert "while" in kernel.lower(x).compile().as_text()          # the kernel's loop, not the gather


def test_attention_for_falls_back_to_xla_where_the_kernel_cannot_run():
    """kernels.Kernels.attention_for: splash needs T in blocks of 128, cuDNN bf16 / fp16; else the choice stands."""
    import dataclasses

    ks = Runtime().kernels
    splash, cudnn = dataclasses.replace(ks, attention="splash"), dataclasses.replace(ks, attention="cudnn")
    assert splash.attention_for(256, jnp.float32) == "splash" and splash.attention_for(200, jnp.bfloat16) == "xla"
    assert cudnn.attention_for(200, jnp.bfloat16) == "cudnn" and cudnn.attention_for(200, jnp.float32) == "xla"
    assert ks.attention_for(7, jnp.float32) == ks.attention
