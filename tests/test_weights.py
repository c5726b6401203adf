"""The weight table (qwen3_jax.weights) is the one declaration of every parameter: the model's parameters, the hub
names and layouts the checkpoint reads and writes, and the partition specs all come from it."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

import qwen3_jax
from qwen3_jax import Qwen3Config, Qwen3ForCausalLM
from qwen3_jax.params import param_count, param_shapes, param_specs
from qwen3_jax.partition import PARAM_RULES, SERVE_PARAM_RULES, IfDivides
from qwen3_jax.weights import weights
from tests.hf_ref import CONFIGS


def _cfg(name) -> Qwen3Config:
    spec = dict(CONFIGS[name])
    kind = spec.pop("kind")
    return Qwen3Config(model_type="qwen3_moe" if kind == "moe" else "qwen3",
                       **({} if kind == "moe" else {"num_experts": 0}), **spec)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_model_creates_exactly_the_tables_parameters(name):
    cfg = _cfg(name)
    table = weights(cfg)
    assert len({w.path for w in table}) == len(table)
    model = Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    flat = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert set(flat) == {w.path for w in table}
    for w in table:
        x = np.asarray(flat[w.path], np.float32)
        assert x.shape == w.shape and flat[w.path].dtype == jnp.bfloat16, w.name
        if w.init == "ones":
            assert np.all(x == 1), w.name
        else:   # normal(std): the table's std (tests compare against transformers by loading, not by init)
            assert w.init == "normal" and abs(x.std() / cfg.initializer_range - 1) < 0.25 and abs(x.mean()) < 0.01, w.name
    assert param_shapes(cfg) == {w.path: w.shape for w in table}
    assert param_count(cfg)["total"] == sum(int(np.prod(w.shape)) for w in table)
    assert (("lm_head",) in flat) == (not cfg.tie_word_embeddings)


def test_layouts_invert_and_read_any_block():
    """For every weight: our layout -> hub tensors (to_hf) -> any block of ours (read), and the fused expert
    tensors of transformers 5 give the same blocks."""
    cfg = _cfg("moe_mixed_yarn_tied")
    rng = np.random.default_rng(0)
    for w in weights(cfg):
        x = rng.standard_normal(w.block_shape).astype(np.float32)
        hub = w.to_hf(x)
        assert [t.shape for t in hub] == w.hub_shapes() and len(hub) == len(w.hf_names(0)), w.name
        read = lambda reqs: [hub[k][idx] for k, idx in reqs]  # noqa: E731
        full = tuple(slice(0, n) for n in w.block_shape)
        np.testing.assert_array_equal(w.read(full, read), x, err_msg=w.name)
        block = tuple(slice(n // 3, n - n // 4) for n in w.block_shape)
        np.testing.assert_array_equal(w.read(block, read), x[block], err_msg=w.name)
        if w.fused is not None:
            f = w.fused(0)
            part = w.path[-1]
            if part == "down_proj":
                fused = np.stack(hub)                                    # [E, D, F]
            else:
                gate, up = (np.stack(t) for t in (_hub(cfg, "gate_proj", rng, x, part == "gate_proj"),
                                                  _hub(cfg, "up_proj", rng, x, part == "up_proj")))
                fused = np.concatenate([gate, up], axis=1)               # [E, 2F, D], gate rows first
            assert fused.shape == f.shape and f.name.endswith("gate_up_proj" if part != "down_proj" else "down_proj")
            fread = lambda reqs: [fused[idx] for _, idx in reqs]  # noqa: E731
            np.testing.assert_array_equal(w.read(block, fread, f), x[block], err_msg=w.name)


def _hub(cfg, part, rng, x, mine):
    """The hub tensors of expert weight `part`: x's if it is the weight under test, else random."""
    w = next(w for w in weights(cfg) if w.path == ("layers", "moe", part))
    return w.to_hf(x if mine else rng.standard_normal(w.block_shape).astype(np.float32))


@pytest.mark.parametrize("name", ["moe_mixed_yarn_tied", "moe_uniform"])
def test_export_names_shapes_from_the_table_and_round_trips_bit_exact(name, tmp_path):
    """ours -> HF files (names and shapes as the table says) -> ours -> HF, bit-exact."""
    cfg = _cfg(name)
    model = Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(1))
    qwen3_jax.save_pretrained(model, tmp_path / "a")
    with safe_open(os.path.join(tmp_path / "a", "model.safetensors"), "np") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    want = {n: s for w in weights(cfg) for i in range(w.count) for n, s in zip(w.hf_names(i), w.hub_shapes())}
    assert stored == want
    again = qwen3_jax.from_pretrained(tmp_path / "a")
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)), nnx.to_flat_state(nnx.state(again, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(p))
    qwen3_jax.save_pretrained(again, tmp_path / "b")
    with safe_open(os.path.join(tmp_path / "a", "model.safetensors"), "np") as fa, \
            safe_open(os.path.join(tmp_path / "b", "model.safetensors"), "np") as fb:
        assert sorted(fa.keys()) == sorted(fb.keys())
        for k in fa.keys():
            np.testing.assert_array_equal(fa.get_tensor(k), fb.get_tensor(k), err_msg=k)


def test_specs_follow_each_weights_logical_axes():
    cfg = _cfg("moe_uniform").replace(hidden_size=48, num_experts=8)
    mesh = {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}
    for rules in (PARAM_RULES, SERVE_PARAM_RULES):
        specs = param_specs(cfg, mesh, rules)
        assert set(specs) == {w.path for w in weights(cfg)}
        for w in weights(cfg):
            spec = tuple(specs[w.path])
            for k, axis in enumerate(w.axes):
                rule = rules[axis]
                if rule is None:
                    assert spec[k] is None, (w.name, axis)
                elif axis == "embed" and "expert" in w.axes:            # FSDP skips the experts' own 'expert'
                    assert spec[k] in ("fsdp", None), (w.name, spec)
                elif not isinstance(rule, IfDivides):
                    assert spec[k] == rule, (w.name, axis, spec)
