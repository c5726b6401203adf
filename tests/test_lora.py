"""LoRA: the adapted forward and PEFT's format against transformers + peft (both ways), adapters-only training
(the base bit-identical, gradients and optimizer state of the adapters only), accumulation and the mesh as for full
fine-tuning, resume after SIGKILL bit-exact, the PEFT / merged exports, --adapter in qwen3-jax-infer, usage errors."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import qwen3_jax
from qwen3_jax.lora import AdapterError, LoRAConfig, check_adapter, init_adapters, load_adapter, save_adapter
from qwen3_jax.model import LoRA
from qwen3_jax.sharding import make_mesh
from qwen3_jax.train import data as D
from qwen3_jax.train import trainer
from qwen3_jax.train.cli import export_main, main
from qwen3_jax.train.step import StepConfig, make_grad_fn, make_optimizer, make_schedule, make_train_step, split_model
from tests.hf_ref import hf_forward, hf_model
from tests.test_train import RUN, _close, _metrics, compile_cache, tiny  # noqa: F401 (module fixtures)

# a LoRA run: dropout (keys from seed, step and micro-batch), accumulation with the global-batch LBL, an eval set
LORA = ["--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0.1", "--grad-accum", "2", "--lr", "1e-2"]


def _random_adapters(cfg, lcfg, seed):
    """Adapters with B != 0 (PEFT starts B at zero: the adapted model would be the base)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape).astype(np.float32) * 0.2),
                        init_adapters(cfg, lcfg, seed))


# ============================================================================ PEFT format, both ways
@pytest.mark.parametrize("name", ["moe_uniform", "moe_mixed_yarn_tied"])
def test_peft_round_trip_against_transformers(reference, name, tmp_path):
    """Our adapter loads in peft on transformers' Qwen3-MoE with the logits of from_pretrained(base, adapter=) and of
    the unmerged training forward; an adapter peft writes loads here with peft's logits (fp32, within 1e-4)."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    _, path, base = reference(name)
    cfg = base.config
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 9))
    lcfg = LoRAConfig(rank=4, alpha=6, dropout=0.1)
    ad = _random_adapters(cfg, lcfg, 2)
    save_adapter(ad, lcfg, cfg, tmp_path / "ours", path)
    conf = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (conf["peft_type"], conf["r"], conf["lora_alpha"], conf["target_modules"]) == \
        ("LORA", 4, 6, ["q_proj", "k_proj", "v_proj", "o_proj"])
    names = sorted(load_file(str(tmp_path / "ours" / "adapter_model.safetensors")))
    assert names[0] == "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
    assert len(names) == cfg.num_hidden_layers * 4 * 2
    peft_model = PeftModel.from_pretrained(hf_model(name), str(tmp_path / "ours")).eval()
    ref, _ = hf_forward(peft_model, ids)
    plain, _ = hf_forward(hf_model(name), ids)
    assert np.abs(ref - plain).max() > 1e-2                       # the adapter changes the logits
    merged = qwen3_jax.from_pretrained(path, adapter=str(tmp_path / "ours"))
    np.testing.assert_allclose(np.asarray(merged(ids).logits), ref, atol=1e-4, rtol=1e-4)
    unmerged = base(ids, lora=LoRA(ad, lcfg.scale))               # the training forward (no dropout without a key)
    np.testing.assert_allclose(np.asarray(unmerged.logits), ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(base(ids).logits), np.asarray(qwen3_jax.from_pretrained(path)(ids).logits))

    # peft -> ours: some projections, an rslora scale
    theirs = get_peft_model(hf_model(name), LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "v_proj"],
                                                       use_rslora=True))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.3)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    ref2, _ = hf_forward(theirs.eval(), ids)
    got = qwen3_jax.from_pretrained(path, adapter=str(tmp_path / "theirs"))(ids).logits
    np.testing.assert_allclose(np.asarray(got), ref2, atol=1e-4, rtol=1e-4)
    lcfg2, loaded = load_adapter(tmp_path / "theirs", cfg)
    assert lcfg2.targets == ("q_proj", "v_proj") and lcfg2.rank == 3 and lcfg2.scale == pytest.approx(5 / 3 ** 0.5)
    assert sorted(loaded) == ["q_proj", "v_proj"] and loaded["q_proj"]["b"].shape == (
        cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim, 3)


def test_bad_adapters_are_named(reference, tmp_path):
    _, path, base = reference("moe_uniform")
    cfg = base.config
    lcfg = LoRAConfig(rank=2)
    save_adapter(init_adapters(cfg, lcfg, 0), lcfg, cfg, tmp_path / "a")
    conf_file, weights = tmp_path / "a" / "adapter_config.json", tmp_path / "a" / "adapter_model.safetensors"
    good_conf, good = conf_file.read_text(), load_file(str(weights))
    name = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"

    def broken(conf=None, tensors=None):
        conf_file.write_text(json.dumps({**json.loads(good_conf), **(conf or {})}))
        save_file(tensors if tensors is not None else good, str(weights))
        with pytest.raises(AdapterError) as e:
            check_adapter(tmp_path / "a", cfg)
        return str(e.value)

    assert "use_dora" in broken({"use_dora": True})
    assert "modules_to_save" in broken({"modules_to_save": ["lm_head"]})
    assert "missing" in broken(tensors={k: v for k, v in good.items() if k != name}) and name in broken(
        tensors={k: v for k, v in good.items() if k != name})
    bad_shape = {**good, name: np.zeros((3, 3), np.float32)}
    assert name in broken(tensors=bad_shape) and "(48, 2)" in broken(tensors=bad_shape)
    expert = "base_model.model.model.layers.0.mlp.experts.gate_up_proj.lora_A.weight"
    assert expert in broken(tensors={**good, expert: np.zeros((2, 40), np.float32)})
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        check_adapter(tmp_path, cfg)
    # the experts and the router are no Linear modules in transformers' Qwen3-MoE: no PEFT adapter can carry them
    for target in ("gate_proj", "down_proj", "gate_up_proj", "router"):
        with pytest.raises(ValueError, match="fused 3-D parameters"):
            LoRAConfig(rank=4, targets=(target,))
    with pytest.raises(ValueError, match="choose from"):
        LoRAConfig(rank=4, targets=("qproj",))


# ============================================================================ the step
def _lora_setup(tiny, mesh, lcfg, **scfg):  # noqa: F811
    model = qwen3_jax.from_pretrained(tiny[0], mesh=mesh, param_dtype="bfloat16")
    graphdef, abstract, base = split_model(model)
    corpus = D.load_corpus([tiny[1]], 32, 512, None)
    batch = trainer.global_batch(next(iter(D.dataset(corpus.examples, 32, 8, seed=0))), mesh)
    adapters = _random_adapters(model.config, lcfg, 3)            # B != 0: every adapter matrix has a gradient
    adapters = jax.device_put(adapters, jax.tree.map(lambda x: x.sharding, init_adapters(model.config, lcfg, 0, mesh)))
    scfg = StepConfig(lbl_coef=0.01, z_loss_coef=1e-3, lora=lcfg, **scfg)
    return graphdef, abstract, base, adapters, batch, scfg


def test_adapters_only_gradients_and_the_base_is_bit_identical(tiny):  # noqa: F811
    """Three optimizer steps: gradients, AdamW moments and updates exist for the adapters only, the frozen bf16 base
    comes out bit-identical, and the adapters moved."""
    mesh = make_mesh(devices=jax.devices()[:1])
    lcfg = LoRAConfig(rank=4, alpha=8, dropout=0.1)
    graphdef, abstract, base, adapters, batch, scfg = _lora_setup(tiny, mesh, lcfg)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(base))
    before = jax.tree.map(np.asarray, base)
    start = jax.tree.map(np.asarray, adapters)
    grad_fn = jax.jit(make_grad_fn(graphdef, abstract, scfg))
    g, aux = grad_fn(adapters, batch, base, jnp.int32(0))
    assert jax.tree.structure(g) == jax.tree.structure(adapters)
    assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g)) and np.isfinite(float(aux["loss"]))
    sched = make_schedule("constant", 1e-2, 0, 3)
    tx = make_optimizer(adapters, schedule=sched, weight_decay=0.01, clip=1.0)
    opt_state = tx.init(adapters)
    n_adapter = sum(x.size for x in jax.tree.leaves(adapters))
    assert sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim) == 2 * n_adapter   # AdamW m, v of the adapters
    step = make_train_step(graphdef, abstract, tx, sched, scfg)
    for i in range(3):
        adapters, opt_state, m = step(adapters, opt_state, batch, jnp.int32(i), base)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, base))
    assert all(not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(adapters)))
    # dropout draws from (seed, step, micro-batch): another step number, other masks, another loss
    aux1, aux1b, aux2 = (grad_fn(adapters, batch, base, jnp.int32(i))[1]["loss"] for i in (1, 1, 2))
    assert float(aux1) == float(aux1b) and float(aux1) != float(aux2)


def test_lora_accumulation_and_mesh_equal_one_big_step(tiny):  # noqa: F811
    """The global-batch LBL, accumulation and expert parallelism are exact for the adapters' gradients too."""
    lcfg = LoRAConfig(rank=4, alpha=8)
    one = make_mesh(devices=jax.devices()[:1])

    def grads(mesh, **kw):
        graphdef, abstract, base, adapters, batch, scfg = _lora_setup(tiny, mesh, lcfg, **kw)
        return jax.jit(make_grad_fn(graphdef, abstract, scfg))(adapters, batch, base)

    full = grads(one)
    _close(grads(one, grad_accum=4), full, rtol=2e-4, atol=2e-5)     # bf16 base: sums in another order
    _close(grads(make_mesh(data=2, expert=4)), full, rtol=2e-4, atol=2e-5)


# ============================================================================ runs
def _train(tiny, out, *extra):  # noqa: F811
    model, data = tiny
    return main(["--model", model, "--data", data, "--output", str(out), *RUN, *LORA, *extra])


@pytest.fixture(scope="module")
def lora_run(tiny, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("lora")
    assert _train(tiny, out, "--eval-data", tiny[1], "--export-hf", str(out / "adapter")) == 0
    return str(out)


def test_lora_run_trains_and_exports_a_peft_adapter(tiny, lora_run, tmp_path):  # noqa: F811
    rows = _metrics(lora_run)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[-1]["lm_loss"] < rows[0]["lm_loss"] - 0.1, [r["lm_loss"] for r in rows]
    assert rows[-1]["eval_loss"] < rows[1]["eval_loss"]
    with open(os.path.join(lora_run, "checkpoints", "8", "meta", "metadata")) as f:
        meta = json.load(f)
    assert meta["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.1, "targets": ["q_proj", "k_proj", "v_proj",
                                                                                  "o_proj"], "rslora": False}
    assert json.load(open(os.path.join(lora_run, "train_args.json")))["param_dtype"] == "bfloat16"
    # the export is the latest step's adapters, in PEFT's files
    cfg, adapters, step, _ = trainer.restore_params(lora_run)
    assert step == 8 and sorted(adapters) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    lcfg, loaded = load_adapter(os.path.join(lora_run, "adapter"), cfg)
    assert lcfg.scale == 2.0 and lcfg.dropout == 0.1
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, adapters))
    assert json.load(open(os.path.join(lora_run, "adapter", "adapter_config.json")))["base_model_name_or_path"] == \
        os.path.abspath(tiny[0])
    # qwen3-jax-export: the same adapter, and --merge-lora the base (bf16, as trained) plus scale * B A
    assert export_main(["--checkpoint", lora_run, "--out", str(tmp_path / "ad")]) == 0
    assert load_file(str(tmp_path / "ad" / "adapter_model.safetensors")).keys() == \
        load_file(os.path.join(lora_run, "adapter", "adapter_model.safetensors")).keys()
    assert export_main(["--checkpoint", lora_run, "--out", str(tmp_path / "merged"), "--merge-lora"]) == 0
    merged, src = load_file(str(tmp_path / "merged" / "model.safetensors")), load_file(
        os.path.join(tiny[0], "model.safetensors"))
    assert sorted(merged) == sorted(src)
    for n, w in merged.items():
        base = src[n].astype(jnp.bfloat16).astype(np.float32)
        m = n.split(".")
        if "self_attn" in n and m[-2] in lcfg.targets:
            i, ab = int(m[2]), loaded[m[-2]]
            a, b = ab["a"][i].reshape(lcfg.rank, -1), ab["b"][i].reshape(-1, lcfg.rank)
            np.testing.assert_allclose(w.astype(np.float32), base + 2.0 * b @ a, atol=0.02, rtol=0.02)
            assert not np.array_equal(w.astype(np.float32), base), n
        else:
            np.testing.assert_array_equal(w.astype(np.float32), base, err_msg=n)   # untouched by training
    # peft on transformers with the exported adapter == qwen3_jax.from_pretrained(base, adapter=) (fp32)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = np.random.default_rng(7).integers(0, 512, (2, 13))
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny[0], dtype="float32"),
                                   os.path.join(lora_run, "adapter")).eval()
    ref, _ = hf_forward(hf, ids)
    ours = qwen3_jax.from_pretrained(tiny[0], adapter=os.path.join(lora_run, "adapter"))
    np.testing.assert_allclose(np.asarray(ours(ids).logits), ref, atol=1e-4, rtol=1e-4)


def test_lora_resume_after_sigkill_is_bit_exact(tiny, lora_run, tmp_path, compile_cache):  # noqa: F811
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "tests._train_slow", "--model", tiny[0], "--data", tiny[1], "--output", str(out),
           *RUN, *LORA, "--eval-data", tiny[1]]
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": compile_cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, deadline = out / "metrics.jsonl", time.time() + 600
    while time.time() < deadline and proc.poll() is None:   # kill once a step after the step-2 checkpoint ran
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    done = [json.loads(ln)["step"] for ln in metrics.read_text().splitlines()]
    assert 3 <= done[-1] < 8
    import orbax.checkpoint as ocp

    assert 2 <= ocp.CheckpointManager(str(out / "checkpoints")).latest_step() < 8  # it resumes mid-run
    # resuming with other LoRA flags (or none) is refused, naming both; the run is left as it was
    assert _train(tiny, out, "--lora-rank", "8") == 2
    assert main(["--model", tiny[0], "--data", tiny[1], "--output", str(out), *RUN]) == 2
    assert _train(tiny, out, "--eval-data", tiny[1]) == 0
    ra, rb = _metrics(lora_run), _metrics(out)
    assert [r["step"] for r in rb] == list(range(1, 9))
    for k in ("loss", "lm_loss", "lbl", "grad_norm", "lr", "eval_loss"):
        assert [r.get(k) for r in ra] == [r.get(k) for r in rb], k
    pa, pb = trainer.restore_params(lora_run)[1], trainer.restore_params(str(out))[1]
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), pa, pb)


def test_lora_usage_errors(tiny, tmp_path, capsys):  # noqa: F811
    model, data = tiny
    base = ["--model", model, "--data", data, "--output", str(tmp_path / "o"), *RUN]
    cases = [(["--lora-alpha", "8"], "--lora-alpha needs --lora-rank"),
             (["--merge-lora", "--export-hf", str(tmp_path / "x")], "--merge-lora needs --lora-rank"),
             (["--lora-rank", "0"], "rank"),
             (["--lora-rank", "4", "--lora-dropout", "1"], "dropout"),
             (["--lora-rank", "4", "--lora-targets", "q_proj,gate_proj"], "fused 3-D parameters"),
             (["--lora-rank", "4", "--freeze", "router"], "--freeze"),
             (["--lora-rank", "4", "--merge-lora"], "--export-hf")]
    for extra, words in cases:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("qwen3-jax-train: error:") and words in err and err.count("\n") == 1, (extra, err)
    assert not (tmp_path / "o").exists()


def test_infer_with_adapter_equals_the_merged_model(reference, tmp_path, capsys):
    """qwen3-jax-infer --adapter DIR generates what the merged model generates; a bad adapter is a usage error."""
    from qwen3_jax.infer import SamplingParams, generate
    from qwen3_jax.infer import cli

    _, path, base = reference("moe_uniform")
    lcfg = LoRAConfig(rank=2, alpha=4)
    save_adapter(_random_adapters(base.config, lcfg, 5), lcfg, base.config, tmp_path / "ad")
    model = qwen3_jax.from_pretrained(path, adapter=str(tmp_path / "ad"))
    prompts = [[5, 6, 7], [100, 20, 30, 40]]
    ref = generate(model, prompts, sampling=SamplingParams(temperature=0.0), max_new_tokens=5)
    plain = generate(base, prompts, sampling=SamplingParams(temperature=0.0), max_new_tokens=5)
    assert [list(r.token_ids) for r in ref] != [list(r.token_ids) for r in plain]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt_token_ids": p}) + "\n" for i, p in enumerate(prompts)))
    argv = ["--model", path, "--input", str(inp), "--dtype", "float32", "--temperature", "0", "--max-new-tokens", "5",
            "--no-progress"]
    assert cli.main([*argv, "--output", str(tmp_path / "out.jsonl"), "--adapter", str(tmp_path / "ad")]) == 0
    got = {r["id"]: r["token_ids"] for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    assert got == {i: list(r.token_ids) for i, r in enumerate(ref)}
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:     # qwen3-jax-infer's usage errors: one line, exit 2
        cli.main([*argv, "--output", str(tmp_path / "o2.jsonl"), "--adapter", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and not (tmp_path / "o2.jsonl").exists()
    assert err.startswith("qwen3-jax-infer: error: --adapter:") and "adapter_config.json" in err
