"""Fine-tuning: losses, data pipeline, jitted step (accumulation, mesh), exact resume, export, CLI, plot."""

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

import qwen3_jax
from qwen3_jax.sharding import make_mesh
from qwen3_jax.train import load_balancing_loss
from qwen3_jax.train import data as D
from qwen3_jax.train import trainer
from qwen3_jax.train.cli import main
from qwen3_jax.train.step import StepConfig, make_grad_fn, split_model

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
            max_position_embeddings=256, torch_dtype="float32")
# one set of run flags for every run that trains (the same step shapes in every run)
RUN = ["--batch-size", "4", "--seq-len", "32", "--steps", "8", "--lr", "3e-3", "--warmup", "2", "--save-every", "2",
       "--mesh", "data=1", "--no-progress", "--weight-decay", "0.01"]


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent compilation cache for this module's subprocesses (the killed run and its rerun compile the step
    once). The test process itself compiles without it (its runs share nothing on disk)."""
    return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir with config + safetensors and no tokenizer files, repetitive pre-tokenized jsonl)."""
    from flax import nnx

    root = tmp_path_factory.mktemp("train")
    cfg = qwen3_jax.Qwen3Config(**TINY)
    qwen3_jax.save_pretrained(qwen3_jax.Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0)), root / "model")
    rng = np.random.default_rng(0)
    with open(root / "data.jsonl", "w") as f:
        for _ in range(64):
            n, s = int(rng.integers(6, 30)), int(rng.integers(0, 40))
            f.write(json.dumps({"input_ids": [(s + j) % 50 + 10 for j in range(n)]}) + "\n")
    return str(root / "model"), str(root / "data.jsonl")


def _train(tiny, out, *extra):
    model, data = tiny
    return main(["--model", model, "--data", data, "--output", str(out), *RUN, *extra])


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f]


@pytest.fixture(scope="module")
def full_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    assert _train(tiny, out, "--eval-data", tiny[1], "--peak-flops", "1e12") == 0
    return str(out)


# ============================================================================ load-balancing loss
def _lbl_reference(logits_lne, k, mask_n):
    """The definition, in numpy: N_E * sum_i f_i P_i per layer, mean over layers."""
    vals = []
    for lg in logits_lne:
        p = np.exp(lg - lg.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        p, m = p[mask_n], np.zeros(lg.shape[-1])
        for row in np.argsort(-p, axis=-1)[:, :k]:
            m[row] += 1
        f, pm = m / (k * len(p)), p.mean(0)
        vals.append(lg.shape[-1] * np.sum(f * pm))
    return float(np.mean(vals))


def test_lbl_definition_and_balanced_router():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 2, 5, 6)).astype(np.float32) * 2
    mask = rng.random((2, 5)) > 0.3
    ref = _lbl_reference(logits.reshape(3, 10, 6), 2, mask.reshape(-1))
    np.testing.assert_allclose(load_balancing_loss(logits, 2, mask), ref, rtol=1e-5)
    np.testing.assert_allclose(load_balancing_loss(logits[1], 2, mask), _lbl_reference(logits[1:2].reshape(1, 10, 6), 2,
                                                                                       mask.reshape(-1)), rtol=1e-5)
    np.testing.assert_allclose(load_balancing_loss(logits, 2), _lbl_reference(logits.reshape(3, 10, 6), 2,
                                                                               np.ones(10, bool)), rtol=1e-5)
    # padding is excluded: masked tokens do not change the value
    noisy = logits.copy()
    noisy[:, ~mask] = 50.0 * rng.normal(size=noisy[:, ~mask].shape)
    np.testing.assert_allclose(load_balancing_loss(noisy, 2, mask), ref, rtol=1e-5)
    # a perfectly balanced router gives 1
    np.testing.assert_allclose(load_balancing_loss(np.zeros((4, 8), np.float32), 2), 1.0, rtol=1e-6)


def test_lbl_equals_transformers_over_top_k():
    import torch
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 7, 8)).astype(np.float32)
    mask = np.ones((2, 7), np.int64)
    mask[1, :3] = 0
    for k in (1, 2, 3):
        for m in (None, mask):
            hf = load_balancing_loss_func((torch.tensor(logits.reshape(14, 8)),), 8, k,
                                          None if m is None else torch.tensor(m))
            ours = load_balancing_loss(logits, k, None if m is None else m.astype(bool))
            np.testing.assert_allclose(float(ours), float(hf) / k, rtol=1e-5)


def test_lbl_uses_the_routed_top_k(tiny):
    """Under a routing intervention (runtime.routing) the LBL counts the experts the model routed to: a layer's own
    top-k (its empty slots not counted), disabled experts never, P from the routing's probabilities (temperature,
    disabling); the train step reports that LBL and those counts."""
    from qwen3_jax.moe import router_choice
    from qwen3_jax.routing import Intervention
    from qwen3_jax.train import lbl_stats, routed_top_k

    model = qwen3_jax.from_pretrained(tiny[0])
    cfg, e = model.config, model.config.num_experts
    assert routed_top_k(model) == cfg.num_experts_per_tok                 # no intervention: the config's top-k
    iv = Intervention(top_k={1: 1}, disable={0: [3]}, temperature={0: 0.5})
    model.runtime = model.runtime.replace(routing=iv)
    routed = routed_top_k(model)
    assert routed.k == (2, 1)
    graphdef, abstract, params = split_model(model)
    corpus = D.load_corpus([tiny[1]], 32, 512, None)
    batch = trainer.global_batch(next(iter(D.dataset(corpus.examples, 32, 4, seed=0))), make_mesh(devices=jax.devices()[:1]))
    out = model(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    real = np.asarray(batch["segment_ids"]).reshape(-1) > 0
    logits = np.asarray(out.router_logits).reshape(len(cfg.moe_layers), -1, e)
    counts = np.asarray(lbl_stats(out.router_logits, routed, batch["segment_ids"] > 0)[0])
    want, ref = [], []
    for i, layer in enumerate(cfg.moe_layers):
        _, ids = router_choice(jnp.asarray(logits[i][real]), cfg, iv, layer)
        ids = np.asarray(ids)
        want.append(np.bincount(ids[ids < e], minlength=e))
        x = logits[i][real] / (0.5 if i == 0 else 1.0)
        if i == 0:
            x[:, 3] = -np.inf
        prob = np.exp(x - x.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
        ref.append(e * np.sum(want[-1] / (routed.k[i] * real.sum()) * prob.mean(0)))
    np.testing.assert_array_equal(counts, np.stack(want))
    assert counts[0, 3] == 0 and counts[1].sum() == real.sum() and counts[0].sum() == 2 * real.sum()
    lbl = float(load_balancing_loss(out.router_logits, routed, batch["segment_ids"] > 0))
    np.testing.assert_allclose(lbl, np.mean(ref), rtol=1e-5)
    plain = float(load_balancing_loss(out.router_logits, cfg.num_experts_per_tok, batch["segment_ids"] > 0))
    assert abs(plain - lbl) > 1e-3
    _, aux = jax.jit(make_grad_fn(graphdef, abstract, StepConfig(lbl_coef=0.01)))(params, batch)
    np.testing.assert_allclose(float(aux["lbl"]), lbl, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(aux["counts"]), counts)


def test_global_differs_from_micro_when_micro_batches_are_imbalanced():
    e, k, n = 8, 2, 16
    # micro-batch 1 routes everything to experts 0-3, micro-batch 2 to experts 4-7: globally balanced
    logits = np.full((2, n, e), -4.0, np.float32)
    for t in range(n):
        logits[0, t, [t % 4, (t + 1) % 4]] = 4.0
        logits[1, t, [4 + t % 4, 4 + (t + 1) % 4]] = 4.0
    glob = float(load_balancing_loss(logits.reshape(2 * n, e), k))
    micro = float(np.mean([load_balancing_loss(logits[i], k) for i in range(2)]))
    assert abs(glob - 1.0) < 1e-5, glob
    assert micro > 1.8 * glob, (micro, glob)


# ============================================================================ data
def test_malformed_lines_reported_and_skipped(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    lines = [json.dumps({"input_ids": [1, 2, 3]}), "{not json", json.dumps([1, 2]), json.dumps({"input_ids": [1, 9999]}),
             json.dumps({"input_ids": [1, 2], "labels": [1]}), json.dumps({"text": "needs a tokenizer"}),
             json.dumps({"foo": 1}), json.dumps({"input_ids": [4, 5, 6], "labels": [-100, -100, -100]}),
             json.dumps({"input_ids": list(range(10, 40))})]
    bad.write_text("\n".join(lines) + "\n")
    corpus = D.load_corpus([str(bad)], 16, 512, trainer.lazy_tokenizer(tiny[0]), log=lambda m: None)
    assert len(corpus.examples) == 3  # the 30-token record (line 9) is split into 16 + 14 tokens
    reasons = {int(s.split(":")[1]): s for s in corpus.skipped}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 8]
    assert all(s.startswith(f"{bad}:") for s in corpus.skipped)
    assert "invalid JSON" in reasons[2] and "JSON object" in reasons[3] and "input_ids" in reasons[4]
    assert "labels" in reasons[5] and "tokenizer" in reasons[6] and "exactly one" in reasons[7]
    assert "no tokens to predict" in reasons[8]
    assert corpus.long == 1 and [len(x["inputs"]) for x in corpus.examples[1:]] == [16, 14]
    with pytest.raises(D.DataError, match=r"bad.jsonl:2: invalid JSON"):
        D.load_corpus([str(bad)], 16, 512, trainer.lazy_tokenizer(tiny[0]), strict=True)
    # through the CLI: --strict fails with exit code 1 and the file:line report
    assert main(["--model", tiny[0], "--data", str(bad), "--output", str(tmp_path / "o"), "--strict", *RUN]) == 1
    assert f"{bad}:2: invalid JSON" in capsys.readouterr().err


def test_long_records_split_or_truncated():
    """A record longer than seq_len: split keeps every (input, target) pair in order, truncate the first seq_len."""
    ids = np.arange(100, 141, dtype=np.int32)             # 41 tokens
    labels = np.where(np.arange(41) < 5, D.IGNORE, ids).astype(np.int32)
    pieces = D.to_examples(ids, labels, 16)
    assert [len(p["inputs"]) for p in pieces] == [16, 16, 9]
    assert np.array_equal(np.concatenate([p["inputs"] for p in pieces]), ids)
    assert np.array_equal(np.concatenate([p["targets"] for p in pieces]), np.append(labels[1:], D.IGNORE))
    (cut,) = D.to_examples(ids, labels, 16, "truncate")
    assert np.array_equal(cut["inputs"], ids[:16]) and np.array_equal(cut["targets"], labels[1:17])
    # a last piece of one token has no target (the example's end): dropped
    assert [len(p["inputs"]) for p in D.to_examples(ids[:17], labels[:17], 16)] == [16]
    with pytest.raises(ValueError, match="overflow"):
        D.to_examples(ids, labels, 16, "wrap")


def test_malformed_count_in_metrics(tiny, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(open(tiny[1]).read() + "oops\n" + json.dumps({"input_ids": []}) + "\n")
    # the run goes on without them, and its exit code says some records were bad (as qwen3-jax-infer's)
    assert main(["--model", tiny[0], "--data", str(data), "--output", str(tmp_path / "o"), *RUN,
                 "--stop-after-steps", "1"]) == 1
    assert _metrics(tmp_path / "o")[0]["skipped_records"] == 2
    assert _metrics(tmp_path / "o")[0]["long_records"] == 0


@pytest.fixture(scope="module")
def qwen_tok(tmp_path_factory):
    from qwen3_jax.infer import Tokenizer

    return Tokenizer.build_qwen(cache_dir=tmp_path_factory.mktemp("tok"))


def test_assistant_only_mask(qwen_tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    ids, labels = D.chat_example(qwen_tok, msgs)
    assert np.array_equal(ids, qwen_tok.apply_chat_template(msgs))
    trained = labels != D.IGNORE
    # trained tokens are exactly the assistant turns' tokens, each through its <|im_end|>
    runs, cur = [], []
    for i, t in zip(ids, trained):
        if t:
            cur.append(int(i))
        elif cur:
            runs.append(cur)
            cur = []
    texts = [qwen_tok.decode(r) for r in runs + ([cur] if cur else [])]
    assert texts == ["Hello! How can I help?<|im_end|>", "<think>\n\n</think>\n\n4<|im_end|>"], texts
    assert np.array_equal(labels[trained], ids[trained])
    # the record form goes through the same path; the target of the token before a turn is its first token
    rec_ids, rec_labels = D.parse_record({"messages": msgs}, lambda: qwen_tok, 151936)
    (ex,) = D.to_examples(rec_ids, rec_labels, 4096)
    assert np.array_equal(ex["targets"][:-1], rec_labels[1:]) and ex["targets"][-1] == D.IGNORE
    # text records: loss on all tokens, <|endoftext|> appended
    t_ids, t_labels = D.parse_record({"text": "hello world"}, lambda: qwen_tok, 151936)
    assert t_ids[-1] == 151643 and np.array_equal(t_ids, t_labels)


def test_assistant_mask_from_generation_blocks(qwen_tok):
    """A template with transformers' {% generation %} blocks (not ChatML): the loss covers exactly those blocks."""
    from qwen3_jax.infer import Tokenizer

    template = ("{% for m in messages %}{% if m.role == 'assistant' %}### Answer: {% generation %}{{ m.content }}"
                "<|endoftext|>{% endgeneration %}\n{% else %}### {{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}")
    tok = Tokenizer(qwen_tok.backend_tokenizer, qwen_tok.config, chat_template=template)
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    ids, labels = D.chat_example(tok, msgs)
    assert np.array_equal(ids, tok.apply_chat_template(msgs))
    keep = labels != D.IGNORE
    assert np.array_equal(labels[keep], ids[keep])
    assert tok.decode(ids[keep].tolist()).lstrip() == "Hello!<|endoftext|>4<|endoftext|>"
    assert tok.decode(ids[~keep].tolist()).startswith("### user: Hi there\n### Answer:")


def test_text_and_chat_records_train_through_main(qwen_tok, tmp_path, capsys):
    """The demo's path: an HF checkpoint dir with the real tokenizer files, text + chat jsonl, --epochs."""
    from flax import nnx

    cfg = qwen3_jax.Qwen3Config(**{**TINY, "vocab_size": 151936, "hidden_size": 32, "num_hidden_layers": 1,
                                   "tie_word_embeddings": True})
    qwen3_jax.save_pretrained(qwen3_jax.Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0)), tmp_path / "m")
    qwen_tok.save_pretrained(tmp_path / "m")
    chat = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
    with open(tmp_path / "d.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"text": f"The number {i} follows {i - 1}."}) + "\n")
            f.write(json.dumps({"messages": chat}) + "\n")
    out = tmp_path / "o"
    assert main(["--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl"), "--output", str(out),
                 "--epochs", "2", "--batch-size", "2", "--seq-len", "32", "--mesh", "data=1", "--no-progress",
                 "--export-hf", str(tmp_path / "hf")]) == 0
    rows = _metrics(out)
    n = D.batches_per_epoch(D.load_corpus([str(tmp_path / "d.jsonl")], 32, 151936, lambda: qwen_tok).examples,
                            32, 2, 0)
    assert len(rows) == 2 * n and all(np.isfinite(r["loss"]) for r in rows)
    printed = capsys.readouterr().out
    assert "lm_loss" in printed and "load max/min" in printed  # the per-step summary table
    assert os.path.exists(tmp_path / "hf" / "tokenizer.json") and os.path.exists(tmp_path / "hf" / "model.safetensors")


def test_packing_equals_separate_sequences(tiny):
    model = qwen3_jax.from_pretrained(tiny[0])
    rng = np.random.default_rng(4)
    docs = [rng.integers(0, 512, n).astype(np.int32) for n in (7, 12, 5, 7)]
    examples = [x for d in docs for x in D.to_examples(d, d, 32)]
    (batch,) = list(D.dataset(examples, 32, 1, seed=0, repeat=False))
    seg, pos = batch["segment_ids"][0], batch["positions"][0]
    assert sorted(np.bincount(seg)[1:].tolist()) == sorted(len(d) for d in docs) and (seg == 0).sum() == 1
    out = model(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    for s in range(1, 5):
        idx = np.nonzero(seg == s)[0]
        assert np.array_equal(pos[idx], np.arange(len(idx)))  # positions restart per document
        alone = model(batch["inputs"][:, idx])
        np.testing.assert_allclose(out.logits[0, idx], alone.logits[0], atol=2e-5)
        np.testing.assert_allclose(out.router_logits[:, 0, idx], alone.router_logits[:, 0], atol=2e-5)
        # the targets stay inside the document (last token of a document predicts nothing)
        assert batch["targets"][0, idx[-1]] == D.IGNORE
        np.testing.assert_array_equal(batch["targets"][0, idx[:-1]], batch["inputs"][0, idx[1:]])


# ============================================================================ step
def _grad_setup(tiny, mesh, **scfg):
    model = qwen3_jax.from_pretrained(tiny[0], mesh=mesh)
    graphdef, abstract, params = split_model(model)
    corpus = D.load_corpus([tiny[1]], 32, 512, None)
    host = next(iter(D.dataset(corpus.examples, 32, 8, seed=0)))
    batch = trainer.global_batch(host, mesh)
    fn = jax.jit(make_grad_fn(graphdef, abstract, StepConfig(lbl_coef=0.01, z_loss_coef=1e-3, **scfg)))
    return fn(params, batch)


def _close(a, b, rtol=1e-5, atol=1e-7):
    ga, gb = a[0], b[0]
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol * max(1.0, float(np.abs(y).max())))
    for k in ("loss", "lm_loss", "lbl", "z_loss"):
        np.testing.assert_allclose(float(a[1][k]), float(b[1][k]), rtol=rtol)


def test_accumulation_equals_one_big_step(tiny):
    one = make_mesh(devices=jax.devices()[:1])
    full = _grad_setup(tiny, one)
    accum = _grad_setup(tiny, one, grad_accum=4)
    _close(accum, full)
    np.testing.assert_array_equal(np.asarray(accum[1]["counts"]), np.asarray(full[1]["counts"]))
    # per-micro-batch scope is a different number (and so are its gradients)
    micro = _grad_setup(tiny, one, grad_accum=4, lbl_scope="micro")
    assert abs(float(micro[1]["lbl"]) - float(full[1]["lbl"])) > 1e-4
    np.testing.assert_allclose(float(micro[1]["lm_loss"]), float(full[1]["lm_loss"]), rtol=1e-5)


def test_multi_device_mesh_matches_one_device(tiny):
    ref = _grad_setup(tiny, make_mesh(devices=jax.devices()[:1]))
    sharded = _grad_setup(tiny, make_mesh(data=2, expert=4))
    _close(sharded, ref, rtol=2e-5, atol=1e-6)


def test_freeze_router_gives_zero_router_grads(tiny):
    g, _ = _grad_setup(tiny, make_mesh(devices=jax.devices()[:1]), freeze=("router", "attention"))
    assert not np.asarray(g["layers"]["moe"]["router"]).any()
    assert not np.asarray(g["layers"]["attn"]["q_proj"]).any()
    assert np.asarray(g["layers"]["moe"]["gate_proj"]).any()


# ============================================================================ runs
def test_loss_falls_and_metrics(full_run):
    rows = _metrics(full_run)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[-1]["lm_loss"] < rows[0]["lm_loss"] - 0.5, [r["lm_loss"] for r in rows]
    r = rows[-1]
    for k in ("loss", "lm_loss", "lbl", "grad_norm", "lr", "tokens_per_s", "mfu", "dropped_tokens", "skipped_records"):
        assert k in r
    assert len(r["expert_load"]["max"]) == 2 and len(r["expert_load"]["cv"]) == 2
    assert 0 <= r["expert_load"]["min"][0] <= 1 / 8 <= r["expert_load"]["max"][0] <= 1
    assert 0.9 < r["lbl"] < 8 and r["lr"] > 0 and rows[0]["lr"] < rows[1]["lr"]  # warmup
    assert 0 < r["mfu"] < 1 and r["tokens_per_s"] > 0 and r["skipped_records"] == 0
    evals = [r.get("eval_loss") for r in rows]
    assert evals[1::2] == [x for x in evals if x is not None] and evals[-1] < evals[1]  # at every save


def test_bf16_compute_with_fp32_master_weights(tiny):
    one = make_mesh(devices=jax.devices()[:1])
    ref = _grad_setup(tiny, one)
    model = qwen3_jax.from_pretrained(tiny[0], dtype="bfloat16", param_dtype="float32", mesh=one, remat="full")
    graphdef, abstract, params = split_model(model)
    corpus = D.load_corpus([tiny[1]], 32, 512, None)
    batch = trainer.global_batch(next(iter(D.dataset(corpus.examples, 32, 8, seed=0))), one)
    g, aux = jax.jit(make_grad_fn(graphdef, abstract, StepConfig(lbl_coef=0.01, z_loss_coef=1e-3)))(params, batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(g))
    np.testing.assert_allclose(float(aux["lm_loss"]), float(ref[1]["lm_loss"]), rtol=2e-2)
    cos = [float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b) + 1e-30))
           for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref[0])) if float(jnp.linalg.norm(b)) > 0]
    assert min(cos) > 0.9, cos


def test_resume_after_stop_is_bit_exact(tiny, full_run, tmp_path):
    out = tmp_path / "stopped"
    assert _train(tiny, out, "--stop-after-steps", "3") == 0
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3]
    meta_file = out / "checkpoints" / "3" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    assert meta == {"step": 3, "skipped_records": 0}  # no training RNG: nothing in a step is random
    meta_file.write_text(json.dumps({**meta, "rng": [0, 3]}))  # as older versions wrote it: still restores
    assert _train(tiny, out) == 0
    _same_run(full_run, out)


def _same_run(a, b):
    ra, rb = _metrics(a), _metrics(b)
    assert [r["step"] for r in rb] == list(range(1, 9))
    for k in ("loss", "lm_loss", "lbl", "grad_norm", "lr"):
        assert [r[k] for r in ra] == [r[k] for r in rb], k
    pa, pb = trainer.restore_params(str(a))[1], trainer.restore_params(str(b))[1]
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_after_sigkill_is_bit_exact(tiny, full_run, tmp_path, compile_cache):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "tests._train_slow", "--model", tiny[0], "--data", tiny[1], "--output", str(out), *RUN]
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": compile_cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    proc = subprocess.Popen(cmd, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    assert _train(tiny, out) == 0
    _same_run(full_run, out)


def test_export_loads_in_transformers_with_equal_logits(tiny, full_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    assert trainer.export_checkpoint(full_run, str(tmp_path / "hf")) == 8
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    ours = qwen3_jax.from_pretrained(str(tmp_path / "hf"))
    ids = np.random.default_rng(5).integers(0, 512, (2, 11))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(ids).logits), ref, atol=2e-4, rtol=2e-4)
    # and the trained params, not the initial ones, were exported
    _, params, _, _ = trainer.restore_params(full_run)
    np.testing.assert_array_equal(np.asarray(ours.embed_tokens[...]), np.asarray(params["embed_tokens"]))
    init = qwen3_jax.from_pretrained(tiny[0])
    assert not np.array_equal(np.asarray(init.embed_tokens[...]), np.asarray(params["embed_tokens"]))
    # the console script form, from one step's directory
    from qwen3_jax.train.cli import export_main

    assert export_main(["--checkpoint", os.path.join(full_run, "checkpoints", "4"), "--out", str(tmp_path / "hf4")]) == 0
    assert os.path.exists(tmp_path / "hf4" / "config.json")


def test_cli_help_yaml_config_and_plot(tiny, full_run, tmp_path, capsys):
    from qwen3_jax.train.cli import parse_args
    from qwen3_jax.train.plot import main as plot_main

    assert main(["--help"]) == 0
    assert "--lbl-scope" in capsys.readouterr().out
    conf = tmp_path / "run.yaml"
    conf.write_text(f"model: {tiny[0]}\ndata: {tiny[1]}\noutput: {tmp_path}/o\nlr: 0.5\nlbl-scope: micro\n"
                    "freeze: router,attention\nbatch_size: 16\n")
    args = parse_args(["--config", str(conf), "--lr", "0.25"])
    assert (args.lr, args.lbl_scope, args.freeze, args.batch_size, args.data) == \
        (0.25, "micro", ["router", "attention"], 16, [tiny[1]])
    assert parse_args(["--config", str(conf), "--data", "x.jsonl"]).data == ["x.jsonl"]
    assert main(["--config", str(conf), "--bogus"]) == 2
    assert plot_main([full_run, "--out", str(tmp_path / "m.png")]) == 0
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_routing_stats_every_writes_the_capture_of_the_held_out_set(tiny, tmp_path, capsys):
    from qwen3_jax.routing import capture

    rng = np.random.default_rng(3)
    recs = [{"input_ids": rng.integers(10, 60, int(rng.integers(5, 45))).tolist(), "domain": "ab"[i % 2]}
            for i in range(6)]
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"input_ids": [1, 999]}\n')
    out = tmp_path / "run"
    assert _train(tiny, out, "--steps", "4", "--routing-stats-every", "3", "--routing-data", str(held)) == 0
    assert f"{held}:7" in capsys.readouterr().out                      # the bad held-out line is named
    assert sorted(os.listdir(out / "routing")) == ["step_3", "step_4"]  # every 3 steps and at the end
    assert [r.get("routing_stats") for r in _metrics(out)] == [None, None, "routing/step_3", "routing/step_4"]
    st = json.loads((out / "routing" / "step_4" / "stats.json").read_text())
    n_tok = sum(len(r["input_ids"]) for r in recs)
    assert st["tokens"] == n_tok and set(st["domains"]) == {"a", "b"}
    assert all(sum(layer["load"]) == 2 * n_tok for layer in st["layers"])
    assert os.path.isfile(out / "routing" / "step_4" / "counts.npz")
    # the counts are those of the final params: a capture of the exported model, same batches (rows of seq-len 32)
    trainer.export_checkpoint(str(out), str(tmp_path / "hf"))
    ref = capture(qwen3_jax.from_pretrained(str(tmp_path / "hf")), [np.asarray(r["input_ids"]) for r in recs],
                  domains=[r["domain"] for r in recs], batch_size=4, max_len=32)
    assert [x["load"] for x in st["layers"]] == [x["load"] for x in ref["layers"]]
    assert st["domains"]["a"]["layers"][0]["load"] == ref["domains"]["a"]["layers"][0]["load"]
    # no held-out set, or one that is not there: a usage / setup error (exit 2) and no run directory
    for extra in (["--routing-stats-every", "2"], ["--routing-stats-every", "2", "--routing-data", str(tmp_path / "no")],
                  ["--routing-data", str(held)]):
        assert _train(tiny, tmp_path / "never", *extra) == 2, extra
    assert not (tmp_path / "never").exists()
