"""The TPU and GPU programs, compiled ahead of time on this CPU by the real TPU compiler (libtpu from the `jax[tpu]`
extra) and XLA:GPU (the CUDA plugin from the `gpu` extra), for abstract chips of a topology, nothing allocated: the
kernels each platform gets, and what the compiled train and decode steps of a small MoE contain and cost per chip
against the model's arithmetic."""

import os

import pytest

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

from qwen3_jax import Qwen3Config, Runtime  # noqa: E402
from qwen3_jax.aot import (collectives, compile_report, format_report, gpu_kernels, model_flops,  # noqa: E402
                           topology_devices)
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


@pytest.fixture(scope="module")
def h100x8():
    try:
        return topology_devices("h100:1x8")
    except ValueError as e:       # the test extra installs the CUDA plugin; say so if it is missing rather than skip
        pytest.fail(str(e))


def test_gpu_topologies():
    """NODESxGPUS names give abstract GPUs of the shipped specs; a bad name is one clear error."""
    two_nodes = topology_devices("h100:2x8")
    assert len(two_nodes) == 16 and {d.platform for d in two_nodes} == {"gpu"}
    assert two_nodes[0].device_kind == "NVIDIA H100 80GB HBM3"
    h200 = topology_devices("h200:1x8")
    assert len(h200) == 8 and h200[0].device_kind == "NVIDIA H200"
    from qwen3_jax.aot import hbm_bytes

    assert hbm_bytes(two_nodes[0]) == 84942979072 and hbm_bytes(h200[0]) == 150754820096   # from the specs
    with pytest.raises(ValueError, match="a100.*choose from h100, h200"):
        topology_devices("a100:1x8")


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
    gpu = Runtime(mesh=make_mesh(expert=8, devices=topology_devices("h100:1x8"))).kernels
    assert (gpu.platform, gpu.gmm, gpu.attention, gpu.ep_dispatch, gpu.decode_kernels, gpu.interpret) == \
        ("gpu", "tokamax", "cudnn", "ragged", False, True)
    assert gpu.device.device_kind == "NVIDIA H100 80GB HBM3" and gpu.gather_rows(128, True) == 0
    assert not gpu.off_platform("tokamax") and tpu.off_platform("tokamax") and cpu.off_platform("megablox")
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


@pytest.mark.parametrize("program,batch,seq", [("train", 8, 512), ("decode", 16, 512)])
def test_compiled_program_for_gpu(h100x8, program, batch, seq):
    """The same programs for one node of 8 H100s (expert=8): tokamax's grouped matmul (forward, d(x), and d(w) as
    the transposed kernel) and cuDNN attention inside, ragged all-to-all between the GPUs, HBM within the GPU. What
    XLA's cost analysis sees stays near the model's arithmetic (ragged_dot expanded densely over the experts read
    E x the expert FLOPs there), and the kernels' FLOPs, counted from their shapes, bring the whole to it."""
    cfg = Qwen3Config(**SMALL)
    rep = compile_report(cfg, "h100:1x8", {"expert": 8}, program=program, batch=batch, seq_len=seq, devices=h100x8)
    text = format_report(rep)
    assert rep["device_kind"] == "NVIDIA H100 80GB HBM3" and rep["chips"] == 8, text
    assert rep["memory"]["fits"] and 0 < rep["memory"]["total"] < 2**30, text
    assert rep["collectives"].get("ragged-all-to-all", 0) >= 2, text
    ker, f = rep["kernels"], rep["flops"]
    if program == "train":
        assert ker["gmm"] >= 6 and ker["tgmm"] >= 3 and ker["cudnn_attention"] >= 2, text   # fwd, dx, dw; fwd, bwd
        assert f["attention_uncounted"], text
        lo, hi = 0.9, 1.3
    else:
        assert ker["gmm"] >= 3 and ker["tgmm"] == 0, text
        assert rep["memory"]["aliased"] > 0, text
        lo, hi = 0.9, 1.5
    assert f["per_layer_kernels"] > 0 and f["per_layer_xla_ratio"] < 1.0, text     # the experts are in the kernels
    assert lo <= f["per_layer_ratio"] <= hi, text
    assert "grouped-matmul kernels" in text and "counted from their shapes" in text


def test_gpu_kernel_flops_from_shapes():
    """A grouped matmul's FLOPs from its custom call's shapes: forward / d(x) [M,K] x [G,K,N] -> [M,N], and d(w)
    [K,M] x [M,N] -> [G,K,N], both 2 M K N; cuDNN attention is listed without FLOPs."""
    meta = 'metadata={op_name="jit(f)/tokamax:PallasMosaicGpuRaggedDot"}'
    hlo = "\n".join([
        '%a = f32[640,128]{1,0} custom-call(%g, %x, %w), custom_call_target="mosaic_gpu_v2", '
        'operand_layout_constraints={s32[9]{0}, bf16[640,256]{1,0}, bf16[2,256,128]{2,1,0}}, ' + meta,
        '%b = bf16[2,256,128]{2,1,0} custom-call(%g, %x, %y), custom_call_target="mosaic_gpu_v2", '
        'operand_layout_constraints={s32[2]{0}, bf16[256,640]{1,0}, bf16[640,128]{1,0}}, ' + meta,
        '%c = (bf16[1,4,512,128]{3,1,2,0}, u8[0]{0}) custom-call(%q, %k, %v), '
        'custom_call_target="__cudnn$fmhaScaleBiasSoftmax"',
    ])
    assert gpu_kernels(hlo) == [{"kind": "gmm", "flops": 2 * 640 * 256 * 128},
                                {"kind": "tgmm", "flops": 2 * 640 * 256 * 128},
                                {"kind": "cudnn_attention", "flops": 0}]


def test_model_flops_arithmetic():
    cfg = Qwen3Config(**SMALL)
    f = model_flops(cfg, "decode", 4, 100)
    active = 256 * (4 + 4) * 128 + 4 * 128 * 256 + 256 * 16 + 4 * 3 * 256 * 128
    assert f["layer_matmul"] == 2 * 4 * active and f["layer_attention"] == 4 * 4 * 4 * 128 * 100
    assert f["total"] == 2 * f["layer"] + 2 * 4 * 256 * 1024
    assert collectives("%a = f32[] all-reduce(x)\n%b = all-gather-start(y)\n%c = all-gather-done(b)") == \
        {"all-gather": 1, "all-reduce": 1}


def test_lora_train_step_fits_one_v5e_host():
    """LoRA on a frozen bf16 base (lower_train_step(lora_rank=16)), compiled for one v5e host (v5e:2x4, expert=8):
    the arguments are the bf16 base's shards plus fp32 adapters and their AdamW moments -- no master copy, no
    moments of the base -- and the experts' weights get no gradient (no transposed grouped matmul)."""
    import numpy as np

    from qwen3_jax.sharding.plan import lora_elems
    from qwen3_jax.params import param_shapes, param_specs
    from qwen3_jax.partition import shard_bytes

    cfg = Qwen3Config(**SMALL)
    rep = compile_report(cfg, "v5e:2x4", {"expert": 8}, program="train", batch=8, seq_len=512, lora_rank=16,
                         count_flops=False)
    text = format_report(rep)
    assert rep["lora_rank"] == 16 and rep["param_dtype"] == "bfloat16" and "LoRA rank 16" in text, text
    assert rep["memory"]["fits"] and rep["device_kind"].startswith("TPU v5"), text
    assert rep["kernels"]["gmm"] >= 2 and rep["kernels"]["tgmm"] == 0, text    # forward and dx; no expert dW
    mesh = {"data": 1, "fsdp": 1, "expert": 8, "tensor": 1}
    specs = param_specs(cfg, mesh)
    base = sum(shard_bytes(shape, np.float16, specs[p], mesh) for p, shape in param_shapes(cfg).items())
    adapters = 4 * lora_elems(cfg, mesh, 16)
    batch = 4 * 512 * 4                                   # inputs, targets, segment ids, positions: a row per chip
    want = base + 3 * adapters + batch                    # adapters, AdamW m and v (+ a few scalars)
    assert want <= rep["memory"]["arguments"] <= 1.01 * want, (rep["memory"]["arguments"], want)
    assert 0.5 < rep["plan_total"] / rep["memory"]["total"] < 2, text
