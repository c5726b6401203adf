"""Mesh, partition rules and expert parallelism on 8 simulated CPU devices (tests/conftest.py), plus a real
two-process run. One tiny random MoE model; the single-device model is the reference throughout."""

import json
import os
import re
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import qwen3_jax
from qwen3_jax import Qwen3Config, Qwen3ForCausalLM
from qwen3_jax.moe import moe_block, route_topk
from qwen3_jax.runtime import Runtime
from qwen3_jax.sharding import (ep_moe, fit_spec, make_mesh, param_shardings, param_specs,
                                shard_model)
from qwen3_jax.sharding import plan

assert jax.device_count() >= 8, "the multi-device tests need 8 (simulated) devices: see tests/conftest.py (XLA_FLAGS)"

CFG = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=40,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  num_experts=16, num_experts_per_tok=4, max_position_embeddings=64)
MESHES = {"expert8": dict(expert=8), "data2_expert4": dict(data=2, expert=4),
          "fsdp2_expert2_tensor2": dict(fsdp=2, expert=2, tensor=2)}
TRAIN = (4, 5)    # 20 tokens: padded to 24 over 8 devices; batch 4 only partly divisible
DECODE = (2, 1)   # 2 tokens on 8 devices
KS = Runtime().kernels  # one device's kernel choices: the reference MoE block


def _build(cfg=CFG, **kw):
    return Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0), **kw)


def _ids(shape, seed=0):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, shape).astype(np.int32)


def _loss(model, ids, cot):
    out = model(ids)
    return jnp.sum(out.logits * cot), out


_fwd = nnx.jit(lambda m, ids: m(ids))
_fwd_grad = nnx.jit(nnx.value_and_grad(_loss, has_aux=True))  # one compile: logits and gradients


def _flat(state):
    return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


@pytest.fixture(scope="module")
def reference():
    """Single-device logits, router logits and parameter gradients for the train and decode batches."""
    model = _build()
    out = {}
    for name, shape in (("train", TRAIN), ("decode", DECODE)):
        ids = _ids(shape)
        cot = np.random.default_rng(1).normal(size=(*shape, CFG.vocab_size)).astype(np.float32)
        (_, o), g = _fwd_grad(model, ids, cot)
        out[name] = (ids, cot, np.asarray(o.logits), np.asarray(o.router_logits), _flat(g))
    return out


@pytest.fixture(scope="module")
def sharded():
    """sharded(name) -> the tiny model placed on that mesh (built once per mesh)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = shard_model(_build(), make_mesh(**MESHES[name]))
        return cache[name]

    return get


# ============================================================================ mesh and rules
def test_make_mesh_axes_sizes_and_errors():
    mesh = make_mesh(data=2, expert=-1)
    assert mesh.axis_names == ("data", "fsdp", "expert", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    assert make_mesh(expert=4, devices=jax.devices()[:4]).size == 4
    with pytest.raises(ValueError, match="8 devices"):
        make_mesh(expert=3)
    with pytest.raises(ValueError, match="only one axis"):
        make_mesh(data=-1, expert=-1)
    with pytest.raises(ValueError, match="positive"):
        make_mesh(expert=0)
    with pytest.raises(ValueError, match="not divisible by the fixed"):
        make_mesh(expert=3, data=-1)
    # 16 experts cannot be split 6 ways; a dense model has no experts to split
    six = make_mesh(expert=6, devices=jax.devices()[:6])
    with pytest.raises(ValueError, match="num_experts=16 is not divisible by .* expert axis size 6"):
        param_shardings(CFG, six)
    with pytest.raises(ValueError, match="num_experts=16"):
        shard_model(_build(), six)
    dense = Qwen3Config(model_type="qwen3", vocab_size=128, hidden_size=64, intermediate_size=96,
                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=0)
    with pytest.raises(ValueError, match="dense"):
        param_shardings(dense, make_mesh(expert=8))


def test_make_mesh_says_why_it_has_no_device_layout(monkeypatch):
    """A mesh the devices' topology cannot lay out (a subset of a slice's chips, a topology jax does not know) is
    still built, in the devices' order, with a warning that says so and why; CPU meshes have no topology."""
    import warnings

    from jax.experimental import mesh_utils

    from qwen3_jax.sharding import MeshLayoutWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", MeshLayoutWarning)
        assert make_mesh(data=2, expert=4).size == 8

    def no_layout(shape, devices, **kw):
        raise NotImplementedError("axes (2, 4) do not map onto the physical torus (1, 3, 2)")

    monkeypatch.setattr(mesh_utils, "create_device_mesh", no_layout)
    with pytest.warns(MeshLayoutWarning, match=r"no topology-aware device layout for data=2, fsdp=1, expert=4, "
                      r"tensor=1 over 8 cpu devices \(NotImplementedError: axes \(2, 4\) do not map"):
        mesh = make_mesh(data=2, expert=4)
    assert list(mesh.devices.flat) == jax.devices()[:8]


def test_activations_degrade_gracefully_when_not_divisible():
    sizes = {"data": 2, "fsdp": 2, "expert": 4, "tensor": 2}
    assert fit_spec(("tensor", ("fsdp", "expert")), (7, 64), sizes) == P(None, ("fsdp", "expert"))
    assert fit_spec((("data", "fsdp", "expert"), None), (4, 3), sizes) == P(("data", "fsdp"), None)
    assert fit_spec((("data", "fsdp", "expert"), None), (1, 3), sizes) == P(None, None)


def test_param_specs_follow_logical_axes_and_say_where_they_may_replicate():
    # GQA with tensor > kv heads: the table says kv heads (and vocab) split only where 'tensor' divides them
    specs = param_specs(CFG.replace(num_key_value_heads=1, num_attention_heads=2), {"tensor": 2, "expert": 8})
    assert specs[("layers", "attn", "k_proj")] == P(None, None, None, "expert")   # 1 kv head: not split
    assert specs[("layers", "attn", "q_proj")] == P(None, "tensor", None, "expert")
    assert specs[("layers", "moe", "gate_proj")] == P(None, "expert", None, "tensor")
    assert param_specs(CFG.replace(vocab_size=127), {"tensor": 2})[("embed_tokens",)] == P(None, None)
    full = param_specs(CFG, {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2})
    assert full[("layers", "moe", "down_proj")] == P(None, "expert", "tensor", "fsdp")
    assert full[("layers", "moe", "router")] == P(None, ("fsdp", "expert"), None)
    assert full[("embed_tokens",)] == P("tensor", ("fsdp", "expert"))
    assert full[("lm_head",)] == P(("fsdp", "expert"), "tensor")
    mixed = param_specs(CFG.replace(mlp_only_layers=[1]), {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2})
    assert mixed[("layers", "mlp", "down_proj")] == P(None, "tensor", ("fsdp", "expert"))
    assert mixed[("layers", "mlp", "up_proj")] == P(None, ("fsdp", "expert"), "tensor")
    assert all(spec[0] is None for path, spec in full.items() if path[0] == "layers")  # layer axis never split
    serve = param_specs(CFG, {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}, qwen3_jax.sharding.SERVE_PARAM_RULES)
    assert serve[("layers", "attn", "q_proj")] == P(None, "tensor", None, None)
    assert serve[("layers", "moe", "gate_proj")] == P(None, "expert", None, "tensor")
    assert serve[("embed_tokens",)] == P("tensor", None) and serve[("layers", "moe", "router")] == P(None, None, None)
    # serving on every device over 'tensor' (qwen3-jax-infer's multi-process default): 4 heads on tensor=8 replicate
    wide = param_specs(CFG, {"tensor": 8}, qwen3_jax.sharding.SERVE_PARAM_RULES)
    assert wide[("layers", "attn", "o_proj")] == P(None, None, None, None)
    assert wide[("layers", "moe", "down_proj")] == P(None, None, "tensor", None)


def test_a_parameter_axis_that_does_not_divide_is_an_error_naming_parameter_and_mesh():
    with pytest.raises(ValueError, match=r"parameter layers/attn/q_proj \(2, 3, 16, 64\): dimension 1 \(heads\) of "
                       r"size 3 is not divisible by mesh axis 'tensor' \(size 2\) of the mesh \(tensor=2, expert=8\)"):
        param_specs(CFG.replace(num_key_value_heads=1, num_attention_heads=3), {"tensor": 2, "expert": 8})
    # the expert width F=36 over tensor=8 (8 query heads divide; the 2 kv heads are replicated)
    mesh = make_mesh(tensor=8)
    with pytest.raises(ValueError, match=r"layers/moe/gate_proj .*dimension 3 \(mlp\) of size 36 .*'tensor' "
                       r"\(size 8\) of the mesh \(data=1, fsdp=1, expert=1, tensor=8\)"):
        shard_model(_build(CFG.replace(num_attention_heads=8, moe_intermediate_size=36)), mesh)
    # FSDP over fsdp x expert: D=64 on fsdp=4 x expert=2 divides; on D=36 the 'expert' factor does not
    odd = CFG.replace(hidden_size=36)
    with pytest.raises(ValueError, match=r"embed_tokens \(128, 36\): dimension 1 \(embed\) of size 36 .*"
                       r"'expert' \(size 2, after \['fsdp'\] of size 4\)"):
        param_specs(odd, {"fsdp": 4, "expert": 2})


def test_a_parameter_no_rule_covers_is_an_error_naming_it():
    regex = ((r"embed_tokens", ("tensor", None)), (r"layers/.*", None))
    with pytest.raises(ValueError, match=r"parameter norm \(64,\): no partition rule matches it .*mesh \(tensor=2\)"):
        param_specs(CFG, {"tensor": 2}, regex)
    partial = {k: v for k, v in qwen3_jax.sharding.PARAM_RULES.items() if k != "router_experts"}
    with pytest.raises(ValueError, match=r"parameter layers/moe/router \(2, 64, 16\): no partition rule for its "
                       r"logical axes \['router_experts'\]"):
        param_specs(CFG, {"tensor": 2}, partial)


def test_a_users_regex_rules_still_place_parameters():
    """rules= also takes today's regex table ((pattern, spec), first match wins), strict the same way."""
    rules = ((r"embed_tokens|lm_head", (None, None)), (r"norm", (None,)), (r"layers/attn/.*norm", (None, None)),
             (r"layers/attn/.*", (None, "tensor", None, None)), (r"layers/moe/router", (None, None, None)),
             (r"layers/moe/.*", (None, "expert", None, None)))
    specs = param_specs(CFG, {"tensor": 2, "expert": 4}, rules)
    assert specs[("layers", "attn", "k_proj")] == P(None, "tensor", None, None)
    assert specs[("layers", "moe", "down_proj")] == P(None, "expert", None, None)
    assert specs[("lm_head",)] == P(None, None)
    with pytest.raises(ValueError, match=r"layers/attn/k_proj .*dimension 1 \(kv_heads\) of size 2 .*'tensor' \(size 4\)"):
        param_specs(CFG, {"tensor": 4}, rules)


@pytest.mark.parametrize("name", list(MESHES))
def test_each_device_holds_only_its_experts(sharded, name):
    model = sharded(name)
    sizes = model.mesh.shape
    w = model.layers.moe.gate_proj[...]
    L, E, D, F = w.shape
    want = (L, E // sizes["expert"], D // sizes["fsdp"], F // sizes["tensor"])
    assert len(w.addressable_shards) == 8
    assert {s.data.shape for s in w.addressable_shards} == {want}
    blocks = {tuple((sl.start or 0) for sl in s.index) for s in w.addressable_shards}
    assert len(blocks) == 8 // (sizes["data"])  # only 'data' replicates expert weights


# ============================================================================ equality with one device
@pytest.mark.parametrize("name", list(MESHES))
@pytest.mark.parametrize("batch", ["train", "decode"])
def test_dropless_ep_equals_single_device(reference, sharded, name, batch):
    ids, cot, logits, router_logits, grads = reference[batch]
    model = sharded(name)
    (_, out), g = _fwd_grad(model, ids, cot)
    assert int(np.asarray(out.dropped_tokens).sum()) == 0  # dropless
    np.testing.assert_allclose(np.asarray(out.logits), logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(out.router_logits), router_logits, atol=1e-5, rtol=0)
    g = _flat(g)
    assert g.keys() == grads.keys()
    for path in grads:  # 1e-5 of each gradient's scale (the sum loss makes embedding grads ~50)
        scale = max(1.0, float(np.abs(grads[path]).max()))
        assert np.abs(g[path] - grads[path]).max() <= 1e-5 * scale, path


def test_mixed_dense_moe_stack_on_mesh():
    """mlp_only_layers: the MoE runs in shard_map inside the scan's lax.cond."""
    cfg = CFG.replace(mlp_only_layers=[1])
    ids = _ids(TRAIN, seed=5)
    ref = _fwd(_build(cfg), ids)
    out = _fwd(shard_model(_build(cfg), make_mesh(data=2, expert=4)), ids)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref.logits), atol=1e-5, rtol=0)


# ============================================================================ what the compiled program does
@pytest.mark.parametrize("name", ["expert8", "data2_expert4"])
def test_hlo_has_all_to_all_and_no_expert_weight_all_gather(sharded, name):
    model = sharded(name)
    hlo = nnx.jit(lambda m, x: m(x).logits).lower(model, _ids(TRAIN)).compile().as_text()
    assert "all-to-all" in hlo
    d, f = CFG.hidden_size, CFG.moe_intermediate_size
    gathers = re.findall(r"= ([^=]*?) all-gather(?:-start)?\(", hlo)
    assert gathers, "expected the FSDP all-gathers of attention weights"
    for shape in gathers:
        dims = [int(x) for x in re.findall(r"\d+", shape.split("{")[0].split("[", 1)[-1])]
        assert not (len(dims) >= 3 and f in dims and d in dims), f"expert weights all-gathered: {shape}"


def test_single_device_model_has_no_collectives(reference):
    hlo = nnx.jit(lambda m, x: m(x).logits).lower(_build(), _ids(TRAIN)).compile().as_text()
    assert "all-to-all" not in hlo and "all-gather" not in hlo


# ============================================================================ capacity, ragged dispatch
def test_capacity_mode_drops_and_reports(reference, sharded):
    ids, _, logits, _, _ = reference["train"]
    model = shard_model(_build(capacity_factor=0.5), sharded("expert8").mesh)
    out = _fwd(model, ids)
    dropped = np.asarray(out.dropped_tokens)
    assert dropped.shape == (len(CFG.moe_layers),) and (dropped > 0).all()
    assert not np.allclose(np.asarray(out.logits), logits, atol=1e-5)
    # a capacity factor large enough drops nothing and equals the single-device model
    model.runtime = model.runtime.replace(capacity_factor=float(CFG.num_experts))
    out = _fwd(model, ids)
    assert int(np.asarray(out.dropped_tokens).sum()) == 0
    np.testing.assert_allclose(np.asarray(out.logits), logits, atol=1e-5, rtol=0)


def _moe_params(seed=0):
    rng = np.random.default_rng(seed)
    e, d, f = CFG.num_experts, CFG.hidden_size, CFG.moe_intermediate_size
    return {"router": jnp.asarray(rng.normal(size=(d, e)), jnp.float32),
            "gate_proj": jnp.asarray(rng.normal(size=(e, d, f)) * 0.1, jnp.float32),
            "up_proj": jnp.asarray(rng.normal(size=(e, d, f)) * 0.1, jnp.float32),
            "down_proj": jnp.asarray(rng.normal(size=(e, f, d)) * 0.1, jnp.float32)}


def test_ep_moe_layer_capacity_drops_only_terms():
    p = _moe_params()
    x = jnp.asarray(np.random.default_rng(3).normal(size=(3, 7, CFG.hidden_size)), jnp.float32)
    rt = Runtime(mesh=make_mesh(data=2, expert=4), capacity_factor=0.75)
    y, logits, dropped = jax.jit(lambda x, p: ep_moe(x, None, p, CFG, rt))(x, p)
    assert int(dropped) > 0
    ref, ref_logits = moe_block(x, p, CFG, KS)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-5)
    # dropped copies only remove terms: rows with nothing dropped are unchanged, at least one row changed
    changed = np.abs(np.asarray(y) - np.asarray(ref)).max(-1) > 1e-5
    assert 0 < changed.sum() <= int(dropped)


def test_ragged_dispatch_bounded_buffers_rounds_and_padding():
    """The ragged_all_to_all dispatch (GPU/TPU), run on CPU through the all_gather emulation of the op:
    - worst-case receive buffers: dropless in one round, values and gradients equal one device;
    - buffers of 0.3 x the mean: one round (training) drops and counts exactly the copies it did not send;
      KV-cached inference sends them in further rounds and equals one device;
    - padding tokens take no expert and are never counted as dropped;
    - lowered with the real op (XLA:CPU cannot compile it): dispatch + combine and their transposes."""
    p = _moe_params(1)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 5, CFG.hidden_size)), jnp.float32)
    mesh = make_mesh(data=2, expert=4)
    ref = moe_block(x, p, CFG, KS)[0]
    rt = Runtime(mesh=mesh, ep_dispatch="ragged_emulated", ep_buffer_factor=None)

    def loss(x, p, rt):
        return jnp.sum(jnp.sin(ep_moe(x, None, p, CFG, rt)[0]))

    y, _, dropped = jax.jit(lambda x, p: ep_moe(x, None, p, CFG, rt))(x, p)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=1e-5, rtol=0)
    assert int(dropped) == 0
    g = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(x, p, rt)
    g_ref = jax.grad(lambda x, p: jnp.sum(jnp.sin(moe_block(x, p, CFG, KS)[0])), argnums=(0, 1))(x, p)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)

    small = rt.replace(ep_buffer_factor=0.3)
    y1, _, d1 = jax.jit(lambda x, p: ep_moe(x, None, p, CFG, small))(x, p)
    changed = np.abs(np.asarray(y1) - np.asarray(ref)).max(-1) > 1e-5
    assert int(d1) > 0 and 0 < changed.sum() <= int(d1)
    # the count is exact: re-derive it from the routing, the token layout and the allocation rule
    from qwen3_jax.moe import receive_rows, round_allocation, token_layout

    w, e = route_topk(x.reshape(-1, CFG.hidden_size) @ p["router"], CFG.num_experts_per_tok, CFG.norm_topk_prob)
    _, n_pad, n_loc = token_layout(10, mesh)
    e_all = np.full((n_pad, CFG.num_experts_per_tok), -1)                     # device padding routes nowhere
    e_all[:10] = np.asarray(e)
    e_dev = e_all.reshape(8, n_loc * CFG.num_experts_per_tok)                 # per device (data-major)
    e_loc = CFG.num_experts // 4
    r = receive_rows(n_loc, CFG.num_experts_per_tok, 4, e_loc, 0.3)
    want = 0
    for group in (range(0, 4), range(4, 8)):                                  # the two expert groups of 4
        sizes = np.array([[np.sum((e_dev[s] >= 0) & (e_dev[s] // e_loc == dst)) for dst in range(4)]
                          for s in group])
        want += int((sizes - np.asarray(round_allocation(jnp.asarray(sizes), r))).sum())
    assert int(d1) == want
    y2, _, d2 = jax.jit(lambda x, p: ep_moe(x, None, p, CFG, small, inference=True))(x, p)
    np.testing.assert_allclose(np.asarray(y2), np.asarray(ref), atol=1e-5, rtol=0)
    assert int(d2) == 0

    valid = jnp.asarray(np.random.default_rng(5).random((2, 5)) > 0.4)
    for r_t in (rt, Runtime(mesh=mesh)):                                       # ragged and padded
        y3, _, d3 = jax.jit(lambda x, v, p: ep_moe(x, v, p, CFG, r_t))(x, valid, p)
        want_y = moe_block(x, p, CFG, KS, valid_bt=valid)[0]
        np.testing.assert_allclose(np.asarray(y3), np.asarray(want_y), atol=1e-5, rtol=0)
        assert not np.asarray(y3)[~np.asarray(valid)].any() and int(d3) == 0
    tight = Runtime(mesh=mesh, capacity_factor=0.5)
    assert int(jax.jit(lambda x, p: ep_moe(x, jnp.zeros((2, 5), bool), p, CFG, tight))(x, p)[2]) == 0  # padding: not dropped

    real = rt.replace(ep_dispatch="ragged")
    text = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2).lower(x, p, real).as_text()
    assert text.count("ragged_all_to_all") == 4  # dispatch + combine, and their transposes
    with pytest.raises(ValueError, match="capacity_factor"):
        ep_moe(x, None, p, CFG, real.replace(capacity_factor=1.0))


def test_kept_rows_whole_ranks_in_order_then_fair_shares():
    """The one-round ragged dispatch's rule: a destination keeps whole choice ranks in order; the rank that does not
    fit is shared max-min fairly over (source, local expert) pairs, not taken from the first sources."""
    from qwen3_jax.moe import kept_rows

    c = np.zeros((4, 2, 2, 2), np.int32)                  # [src, dst, rank, local expert]
    c[:, 0, 0, 0] = 10                                    # every source: 10 first choices for dst 0, expert 0
    c[:, 0, 1, 1] = 5                                     # and 5 second choices, expert 1
    c[0, 1, 0, 1] = 3
    kept = np.asarray(kept_rows(jnp.asarray(c), 16))
    assert kept[:, 0, 0, 0].tolist() == [4, 4, 4, 4] and not kept[:, 0, 1].any()  # no source left out
    assert kept[0, 1, 0, 1] == 3 and kept.sum() == 19
    kept = np.asarray(kept_rows(jnp.asarray(c), 18))      # 2 rows left over: one each, from the dst's own source
    assert kept[:, 0, 0, 0].tolist() == [5, 5, 4, 4]
    kept = np.asarray(kept_rows(jnp.asarray(c), 50))      # all first choices, then 10 of the 20 second ones
    assert (kept[:, 0, 0, 0] == 10).all() and kept[:, 0, 1, 1].tolist() == [3, 3, 2, 2]
    c2 = np.zeros((2, 1, 1, 4), np.int32)
    c2[0, 0, 0] = [6, 1, 0, 9]                            # one rank over 2 sources x 4 experts: 12 of 18 fit
    c2[1, 0, 0] = [0, 2, 0, 0]
    kept = np.asarray(kept_rows(jnp.asarray(c2), 12))
    assert kept[0, 0, 0].tolist() == [5, 1, 0, 4] and kept[1, 0, 0].tolist() == [0, 2, 0, 0]  # level 4, +1

    rng = np.random.default_rng(0)
    for trial in range(20):
        counts = rng.integers(0, 7, (4, 4, 3, 4)).astype(np.int32)
        r = int(rng.choice([8, 16, 40, 200]))
        kept = np.asarray(kept_rows(jnp.asarray(counts), r))
        assert (kept >= 0).all() and (kept <= counts).all()
        for d in range(4):
            assert kept[:, d].sum() == min(r, counts[:, d].sum())
            short = kept[:, d].sum((0, 2)) < counts[:, d].sum((0, 2))       # per rank: some row dropped
            for j in np.nonzero(short)[0]:
                assert not kept[:, d, j + 1:].any(), (trial, d, j)          # later ranks drop first
                cut = kept[:, d, j][kept[:, d, j] < counts[:, d, j]]
                assert cut.min() >= kept[:, d, j].max() - 1, (trial, d, j)  # max-min fair over the pairs


def _slot_layout(x, p, mesh):
    """Routing of every token and each device's slots: (weights [N, k], experts [N, k], e_dev [devices, n_loc, k]
    with -1 for device padding), as ep_moe lays the tokens out (data-major over the token axes)."""
    from qwen3_jax.moe import token_layout

    w, e = route_topk(x.reshape(-1, CFG.hidden_size) @ p["router"], CFG.num_experts_per_tok, CFG.norm_topk_prob)
    n = w.shape[0]
    _, n_pad, n_loc = token_layout(n, mesh)
    e_all = np.full((n_pad, CFG.num_experts_per_tok), -1)
    e_all[:n] = np.asarray(e)
    return np.asarray(w), np.asarray(e), e_all.reshape(mesh.size, n_loc, CFG.num_experts_per_tok)


def _moe_with_kept(x, p, w, e, keep):
    """y [N, D] of the kept (token, choice) slots, each with its own router weight (float64 numpy)."""
    x = np.asarray(x, np.float64).reshape(-1, CFG.hidden_size)
    g, u, dn = (np.asarray(p[k], np.float64) for k in ("gate_proj", "up_proj", "down_proj"))
    y = np.zeros_like(x)
    for t, j in zip(*np.nonzero(keep)):
        h = x[t] @ g[e[t, j]]
        y[t] += w[t, j] * ((h / (1 + np.exp(-h))) * (x[t] @ u[e[t, j]])) @ dn[e[t, j]]
    return y


def test_training_dispatch_drops_later_choices_first_spread_and_unnormalised():
    """One training round with too little room, ragged (GPU/TPU; the all_gather emulation here) and padded: the
    output is exactly the sum over the kept (token, choice) slots of router weight x expert output (a dropped
    choice contributes zero, the kept keep their weights), the kept slots are those of the rules (ragged: kept_rows,
    then token order in each (source, expert); padded: per (source, destination) by choice rank, then token
    order), a later choice is dropped before an earlier one, every source keeps rows, and the count is exact."""
    from qwen3_jax.moe import capacity, kept_rows, receive_rows

    p = _moe_params(2)
    x = jnp.asarray(np.random.default_rng(6).normal(size=(4, 12, CFG.hidden_size)), jnp.float32)
    mesh = make_mesh(data=2, expert=4)
    ep, k, e_loc = 4, CFG.num_experts_per_tok, CFG.num_experts // 4
    w, e, e_dev = _slot_layout(x, p, mesh)
    n_loc = e_dev.shape[1]

    def check(rt, keep_dev):
        y, _, dropped = jax.jit(lambda x, p: ep_moe(x, None, p, CFG, rt))(x, p)
        keep = keep_dev.reshape(-1, k)[:w.shape[0]]
        assert int(dropped) == int((~keep).sum()) > 0
        np.testing.assert_allclose(np.asarray(y).reshape(-1, CFG.hidden_size), _moe_with_kept(x, p, w, e, keep),
                                   atol=1e-4, rtol=1e-4)
        return keep_dev

    # ragged: per expert group (one data row of 4 devices), the table of kept_rows, a pair's first tokens kept
    r = receive_rows(n_loc, k, ep, e_loc, 0.5)
    keep_dev = np.zeros(e_dev.shape, bool)
    for group in (range(0, 4), range(4, 8)):
        counts = np.zeros((ep, ep, k, e_loc), np.int32)
        for s, dev in enumerate(group):
            for j in range(k):
                for ex in e_dev[dev, :, j][e_dev[dev, :, j] >= 0]:
                    counts[s, ex // e_loc, j, ex % e_loc] += 1
        kept = np.asarray(kept_rows(jnp.asarray(counts), r))
        for s, dev in enumerate(group):
            for j in range(k):
                for ex in range(CFG.num_experts):
                    ts = np.nonzero(e_dev[dev, :, j] == ex)[0]
                    keep_dev[dev, ts[:kept[s, ex // e_loc, j, ex % e_loc]], j] = True
            assert keep_dev[dev].any()                                       # every source keeps rows
        for dst in range(ep):                                                # later choices are dropped first
            to_dst = np.stack([e_dev[dev] // e_loc == dst for dev in group])  # [src, n_loc, k]
            held = np.stack([keep_dev[dev] for dev in group])
            lost = [(to_dst[..., j] & ~held[..., j]).any() for j in range(k)]
            for j in range(k):
                if lost[j]:
                    assert not (to_dst[..., j + 1:] & held[..., j + 1:]).any()
    check(Runtime(mesh=mesh, ep_dispatch="ragged_emulated", ep_buffer_factor=0.5), keep_dev)

    # padded: C slots per (source, destination), first choices of every token before any second choice
    cap = capacity(n_loc, k, ep, e_loc, 0.5)
    keep_dev = np.zeros(e_dev.shape, bool)
    for dev in range(e_dev.shape[0]):
        taken = np.zeros(ep, int)
        for j in range(k):
            for t in range(n_loc):
                ex = e_dev[dev, t, j]
                if ex >= 0 and taken[ex // e_loc] < cap:
                    taken[ex // e_loc] += 1
                    keep_dev[dev, t, j] = True
    check(Runtime(mesh=mesh, capacity_factor=0.5), keep_dev)


def test_kv_cached_inference_never_drops():
    """Whatever capacity_factor / ep_buffer_factor say, KV-cached inference (ep_moe(inference=True), a model call
    with a cache) drops nothing and equals one device."""
    p = _moe_params(1)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 5, CFG.hidden_size)), jnp.float32)
    mesh = make_mesh(data=2, expert=4)
    ref = moe_block(x, p, CFG, KS)[0]
    for rt in (Runtime(mesh=mesh, capacity_factor=0.25), Runtime(mesh=mesh, ep_dispatch="ragged_emulated",
                                                                  ep_buffer_factor=0.25)):
        assert int(jax.jit(lambda x, p: ep_moe(x, None, p, CFG, rt))(x, p)[2]) > 0  # training: drops
        y, _, dropped = jax.jit(lambda x, p: ep_moe(x, None, p, CFG, rt, inference=True))(x, p)
        np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=1e-5, rtol=0)
        assert int(dropped) == 0
    from qwen3_jax.model import KVCache

    ids = _ids(TRAIN, seed=3)
    cached = nnx.jit(lambda m, ids: m(ids, cache=KVCache.init(CFG, TRAIN[0], 8)))
    one = cached(_build(), ids)
    model = shard_model(_build(capacity_factor=0.25), mesh)
    assert int(np.asarray(_fwd(model, ids).dropped_tokens).sum()) > 0            # without a cache: a training forward
    out = cached(model, ids)
    assert int(np.asarray(out.dropped_tokens).sum()) == 0
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(one.logits), atol=1e-5, rtol=0)


# ============================================================================ loading and multi-process
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ep_ckpt"))
    qwen3_jax.save_pretrained(_build(), path)
    return path


def test_from_pretrained_places_tensors_in_their_shards(reference, checkpoint):
    ids, _, logits, _, _ = reference["train"]
    mesh = make_mesh(fsdp=2, expert=2, tensor=2)
    model = qwen3_jax.from_pretrained(checkpoint, mesh=mesh)
    assert model.mesh is mesh
    want = param_shardings(CFG, mesh)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        arr = var.get_value()
        assert arr.sharding.is_equivalent_to(want[tuple(path)], arr.ndim), path
    # used as on one device: no context manager, eager or under jit
    np.testing.assert_allclose(np.asarray(model(ids).logits), logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(_fwd(model, ids).logits), logits, atol=1e-5, rtol=0)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_process_expert_parallel_forward_equals_one_device(checkpoint):
    """jax.distributed on localhost (gloo): 2 processes x 2 CPU devices, expert=4 across both."""
    worker = os.path.join(os.path.dirname(__file__), "_ep_worker.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, worker, str(i), str(port), checkpoint], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err[-3000:]
            results.append(json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert sorted(r["process"] for r in results) == [0, 1]
    for r in results:
        assert (r["processes"], r["devices"], r["local_devices"]) == (2, 4, 2)
        assert r["all_to_all"] and r["placed_ok"] and r["local_experts"] == CFG.num_experts // 4
        assert r["err"] <= 1e-5, r


# ============================================================================ plan
def test_plan_cli_table_and_shard_sizes(capsys):
    argv = ["--preset", "Qwen3-30B-A3B", "--mesh", "data=4,expert=8", "--dtype", "bfloat16",
            "--batch", "256", "--seq", "4096"]
    assert plan.main(argv) == 0
    text = capsys.readouterr().out
    for row in ("weights", "gradients", "AdamW", "cross-entropy logits", "activations", "TPU v5e 16G", "H200 141G"):
        assert row in text
    cfg = Qwen3Config.preset("Qwen3-30B-A3B")
    mesh = plan.parse_mesh("data=4,expert=8")
    r = plan.plan(cfg, mesh, "bfloat16", 256, 4096)                  # train: fp32 master weights
    experts = 3 * 48 * 128 * 2048 * 768                             # gate, up, down
    norms = 48 * (2 * 2048 + 2 * 128) + 2048                         # replicated
    rest = qwen3_jax.param_count(cfg)["total"] - experts - norms     # attention, router, embeddings: D over expert
    assert r["params"] == (experts // 8 + rest // 8 + norms) * 4
    assert r["adam"] == 2 * r["params"] and r["grads"] == r["params"] and r["update"] == r["params"]
    assert r["logits"] == 3 * (256 // 32) * 512 * cfg.vocab_size * 4   # one CE chunk, never [B, T, V]
    assert r["total"] == sum(r[k] for k in r["items"])
    d = plan.plan(cfg, plan.parse_mesh("expert=8"), "bfloat16", 64, 4096, program="decode")
    assert d["kv"] == 48 * 2 * (64 // 8) * 4096 * 4 * 128 * 2      # batch split over expert
    assert plan.main(["--mesh", "data=4,bogus=2"]) == 2
    assert plan.main(["--preset", "Qwen3-30B-A3B", "--mesh", "expert=3"]) == 2   # 128 experts / 3
