"""The TPU programs, compiled ahead of time on this CPU by the real TPU compiler (libtpu from the `jax[tpu]` extra;
abstract chips of a topology, nothing allocated): the kernels each platform gets, and what the compiled train and
decode steps of a small MoE contain and cost per chip against the model's arithmetic."""

import os

import pytest

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

from qwen3_jax import Qwen3Config, Runtime, kernels  # noqa: E402
from qwen3_jax.aot import collectives, compile_report, format_report, model_flops, topology_devices  # noqa: E402
from qwen3_jax.sharding import make_mesh  # noqa: E402

# small, but with every dimension a TPU tile takes whole (head_dim 128, widths of 128 lanes)
SMALL = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=128, num_experts=16, num_experts_per_tok=4,
             max_position_embeddings=4096)


@pytest.fixture(scope="module")
def v5p8():
    try:
        return topology_devices("v5p:2x2x2")
    except ValueError as e:       # the test extra installs libtpu; say so if it is missing rather than skip
        pytest.fail(str(e))


def test_platform_comes_from_the_mesh_devices(v5p8):
    """Abstract TPU chips pick the TPU kernels although this process's backend is the CPU."""
    assert jax.default_backend() == "cpu"
    tpu = Runtime(mesh=make_mesh(expert=8, devices=v5p8)).kernels
    assert (tpu.platform, tpu.gmm, tpu.attention, tpu.ep_dispatch, tpu.decode_kernels, tpu.kv_cache) == \
        ("tpu", "megablox", "splash", "ragged", False, "carried")
    assert not tpu.interpret and tpu.gather_rows(128, True) == 0
    cpu = Runtime(mesh=make_mesh(expert=8, devices=jax.devices()[:8])).kernels
    assert (cpu.platform, cpu.gmm, cpu.attention, cpu.ep_dispatch, cpu.kv_cache) == \
        ("cpu", "cpu", "chunked", "padded", "deferred")
    assert Runtime(mesh=make_mesh(expert=8, devices=v5p8), gmm="ragged_dot").kernels.gmm == "ragged_dot"
    assert Runtime(mesh=make_mesh(expert=8, devices=v5p8), kv_cache="deferred").kernels.kv_cache == "deferred"
    with pytest.raises(ValueError, match="kv_cache='copied': choose from auto, carried, deferred"):
        Runtime(kv_cache="copied").kernels


def test_v5e_over_16_chips_falls_back_to_the_padded_dispatch():
    """The TPU compiler cannot lower ragged_all_to_all on v5e slices over 16 chips: padded buffers of
    ep_buffer_factor capacity there, the ragged dispatch on 16."""
    big = Runtime(mesh=make_mesh(fsdp=8, expert=8, devices=topology_devices("v5e:8x8")), ep_buffer_factor=1.5)
    assert (big.kernels.ep_dispatch, big.kernels.padded_capacity) == ("padded", 1.5)
    small = Runtime(mesh=make_mesh(fsdp=2, expert=8, devices=topology_devices("v5e:4x4")))
    assert (small.kernels.ep_dispatch, small.kernels.padded_capacity) == ("ragged", None)


def test_make_mesh_over_given_devices(v5p8):
    mesh = make_mesh(data=2, expert=-1, devices=v5p8)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    assert {d.id for d in mesh.devices.flat} == {d.id for d in v5p8}
    with pytest.raises(ValueError, match="devices"):
        make_mesh(expert=16, devices=v5p8)


@pytest.mark.parametrize("program,batch,seq,flop_range", [
    ("train", 8, 512, (0.9, 1.35)),      # splash reports no FLOPs: compared against the matmuls
    ("decode", 16, 512, (0.9, 1.5)),
])
def test_compiled_program_for_tpu(v5p8, program, batch, seq, flop_range):
    """The real train step (chunked CE, LBL, AdamW, remat full) and the engine's decode step for v5p:2x2x2
    (expert=8): megablox and splash inside, ragged all-to-all between the chips, HBM within the chip, and FLOPs
    per layer (layers unrolled) within range of the model's arithmetic."""
    cfg = Qwen3Config(**SMALL)
    rep = compile_report(cfg, "v5p:2x2x2", {"expert": 8}, program=program, batch=batch, seq_len=seq, devices=v5p8)
    text = format_report(rep)
    assert rep["device_kind"].startswith("TPU v5") and rep["chips"] == 8, text
    assert rep["memory"]["fits"] and 0 < rep["memory"]["total"] < 2**30, text
    assert rep["collectives"].get("ragged-all-to-all", 0) >= 2, text          # dispatch and return, per MoE layer
    ker = rep["kernels"]
    if program == "train":
        assert ker["gmm"] >= 3 and ker["tgmm"] >= 1 and ker["splash"] >= 1, text  # fwd, dx, dw; attention
        assert rep["flops"]["attention_uncounted"]
    else:
        assert ker["gmm"] >= 1 and ker["tgmm"] == 0 and ker["splash"] == 0, text  # no backward; cached attention
        assert rep["memory"]["aliased"] > 0, text                             # the cache updated in place
    lo, hi = flop_range
    assert lo <= rep["flops"]["per_layer_ratio"] <= hi, text
    assert rep["flops"]["per_layer"] > 0 and rep["plan_total"] > 0


def test_model_flops_arithmetic():
    cfg = Qwen3Config(**SMALL)
    f = model_flops(cfg, "decode", 4, 100)
    active = 256 * (4 + 4) * 128 + 4 * 128 * 256 + 256 * 16 + 4 * 3 * 256 * 128
    assert f["layer_matmul"] == 2 * 4 * active and f["layer_attention"] == 4 * 4 * 4 * 128 * 100
    assert f["total"] == 2 * f["layer"] + 2 * 4 * 256 * 1024
    assert collectives("%a = f32[] all-reduce(x)\n%b = all-gather-start(y)\n%c = all-gather-done(b)") == \
        {"all-gather": 1, "all-reduce": 1}
