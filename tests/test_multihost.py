"""Pod-scale runs on localhost: 2 processes x 4 simulated CPU devices (jax.distributed, gloo) against 1 process
x 8 devices, both on the mesh data=2, expert=4.

Fine-tuning with qwen3-jax-train (the same flags; a data file whose records split unevenly across the hosts,
with one malformed record that only process 1 reads): per-step loss and lbl, the eval loss and the exported
safetensors equal the single-process run's. Both processes are SIGKILLed mid-run, at a known step, and the rerun
of the same command resumes exactly. qwen3-jax-export over 2 processes writes the same checkpoint, and
qwen3-jax-infer over 2 processes writes each id exactly once, with the single process's tokens. Every subprocess
has a timeout, so a hang fails the test.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import qwen3_jax
from tests.test_checkpoint import _tensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300  # seconds for one multi-process command (they take ~20-40 s here)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
            max_position_embeddings=256, torch_dtype="float32", eos_token_id=None, bos_token_id=None)
N_RECORDS, BAD_RECORD, N_EVAL = 61, 5, 13  # 8 data shards: process 0 reads 32 records, process 1 29 (one bad)


@pytest.fixture(scope="module")
def pod(tmp_path_factory):
    """Model directory, training and eval jsonl, and the run flags (the same for 1 and 2 processes)."""
    from flax import nnx

    root = tmp_path_factory.mktemp("pod")
    cfg = qwen3_jax.Qwen3Config(**TINY)
    qwen3_jax.save_pretrained(qwen3_jax.Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0)), root / "model")
    rng = np.random.default_rng(0)

    def record():
        n, s = int(rng.integers(6, 30)), int(rng.integers(0, 40))
        return json.dumps({"input_ids": [(s + j) % 50 + 10 for j in range(n)]})

    (root / "train.jsonl").write_text("".join(("{not json" if r == BAD_RECORD else record()) + "\n"
                                              for r in range(N_RECORDS)))
    (root / "eval.jsonl").write_text("".join(record() + "\n" for _ in range(N_EVAL)))
    flags = ["--model", str(root / "model"), "--data", str(root / "train.jsonl"), "--eval-data", str(root / "eval.jsonl"),
             "--batch-size", "8", "--seq-len", "32", "--steps", "8", "--lr", "3e-3", "--warmup", "2",
             "--save-every", "3", "--mesh", "data=2,expert=4", "--no-progress", "--routing-stats-every", "4"]
    return {"root": root, "model": str(root / "model"), "flags": flags}


def _start(root, name, command, args, *extra):
    """Both processes of one command line; their stdout+stderr go to <root>/<name>-<i>.log."""
    import portpicker

    port = portpicker.pick_unused_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = []
    for i in range(2):
        log = open(root / f"{name}-{i}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests._pod_worker", *extra, command, *args, "--coordinator", f"127.0.0.1:{port}",
             "--num-processes", "2", "--process-id", str(i)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        log.close()
    return procs


def _logs(root, name) -> str:
    return "\n".join(f"--- process {i}:\n" + (root / f"{name}-{i}.log").read_text()[-3000:] for i in range(2))


def _kill(procs):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()


def _finish(root, name, procs) -> list[int]:
    deadline = time.monotonic() + TIMEOUT
    try:
        return [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in procs]
    except subprocess.TimeoutExpired:
        _kill(procs)
        pytest.fail(f"{name}: no exit within {TIMEOUT} s (a hang)\n{_logs(root, name)}")


def _run2(root, name, command, args, *extra) -> list[int]:
    return _finish(root, name, _start(root, name, command, args, *extra))


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f]


@pytest.fixture(scope="module")
def single(pod):
    """The 1-process run (8 devices in this pytest process): its output directory."""
    from qwen3_jax.train.cli import main

    out = pod["root"] / "one"
    assert main([*pod["flags"], "--output", str(out), "--export-hf", str(out / "hf")]) == 1  # 1: a bad record
    return out


@pytest.fixture(scope="module")
def killed(pod):
    """The 2-process run: both processes SIGKILLed while at step 6 (checkpoints at 3 and 6), then the same
    command again. Returns (output dir, metrics when killed, latest checkpoint when killed, exit codes)."""
    import orbax.checkpoint as ocp

    root = pod["root"]
    out = root / "two"
    args = [*pod["flags"], "--output", str(out), "--export-hf", str(out / "hf")]
    procs = _start(root, "held", "train", args, "--hold-at", "6")
    deadline = time.monotonic() + TIMEOUT
    while not all((out / f"held-{i}").exists() for i in range(2)):
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            _kill(procs)
            pytest.fail(f"the run did not reach step 6\n{_logs(root, 'held')}")
        time.sleep(0.05)
    _kill(procs)
    assert [p.returncode for p in procs] == [-signal.SIGKILL] * 2
    killed_metrics = _metrics(out)
    latest = ocp.CheckpointManager(str(out / "checkpoints")).latest_step()
    codes = _run2(root, "resumed", "train", args)
    return out, killed_metrics, latest, codes


def test_two_processes_write_the_metrics_of_one(pod, single, killed):
    out, _, _, codes = killed
    assert codes == [1, 1], _logs(pod["root"], "resumed")  # both: the run had a bad record
    one, two = _metrics(single), _metrics(out)
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 9))
    for a, b in zip(one, two):
        for k in ("loss", "lm_loss", "lbl", "grad_norm"):
            assert abs(a[k] - b[k]) <= 1e-5 * abs(a[k]), (a["step"], k, a[k], b[k])
        # global counts: the tokens behind the loss, the malformed record that only process 1 read
        for k in ("real_tokens", "skipped_records", "long_records", "dropped_tokens", "lr"):
            assert a[k] == b[k], (a["step"], k)
        assert a["skipped_records"] == 1 and (a.get("eval_loss") is None) == (b.get("eval_loss") is None)
    evals = [(a["step"], a["eval_loss"], b["eval_loss"]) for a, b in zip(one, two) if a.get("eval_loss") is not None]
    assert [s for s, _, _ in evals] == [3, 6, 8]
    for _, a, b in evals:
        assert abs(a - b) <= 1e-5 * a, evals
    # each host read its own share: only process 1 read (and reported) the malformed record 5
    logs = [(pod["root"] / f"resumed-{i}.log").read_text() for i in range(2)]
    bad = f"train.jsonl:{BAD_RECORD + 1}: invalid JSON"
    assert bad not in logs[0] and bad in logs[1]
    # process 0 writes the run's files
    assert json.load(open(out / "train_args.json"))["process_id"] == 0


def test_export_hf_of_two_processes_equals_one(single, killed):
    a, b = _tensors(single / "hf"), _tensors(killed[0] / "hf")
    assert sorted(a) == sorted(b) and len(a) > 10
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-6, err_msg=k)
    assert json.load(open(single / "hf" / "config.json")) == json.load(open(killed[0] / "hf" / "config.json"))


def test_routing_stats_of_two_processes_equal_one(pod, single, killed):
    """--routing-stats-every 4 (the eval set): every process captures the same batches, process 0 writes."""
    out = killed[0]
    n_tok = sum(len(json.loads(x)["input_ids"]) for x in (pod["root"] / "eval.jsonl").read_text().splitlines())
    for step in (4, 8):
        a, b = (json.load(open(d / "routing" / f"step_{step}" / "stats.json")) for d in (single, out))
        assert a["tokens"] == b["tokens"] == n_tok and a["sequences"] == b["sequences"] == N_EVAL
        for la, lb in zip(a["layers"], b["layers"]):
            assert sum(la["load"]) == sum(lb["load"]) == 2 * n_tok
            # params equal to ~1e-6 (test_export_hf_...): at most a near-tie flips
            assert np.abs(np.subtract(la["load"], lb["load"])).sum() <= 4, (step, la["load"], lb["load"])
    assert sorted(os.listdir(out / "routing")) == ["step_4", "step_8"]


def test_sigkill_of_both_processes_then_rerun_resumes_exactly(pod, killed):
    out, killed_metrics, latest, _ = killed
    # held at step 6: steps 1-5 logged, the step-3 checkpoint complete, the step-6 one not begun
    assert [r["step"] for r in killed_metrics] == [1, 2, 3, 4, 5] and latest == 3
    assert f"resumed from {out / 'checkpoints'}/3 at step 3" in (pod["root"] / "resumed-0.log").read_text()
    # steps 4 and 5 ran twice, before the kill and after the resume: bit for bit the same
    rerun = {r["step"]: r for r in _metrics(out)}
    for r in killed_metrics:
        for k in ("loss", "lm_loss", "lbl", "grad_norm", "real_tokens"):
            assert rerun[r["step"]][k] == r[k], (r["step"], k)


def test_export_cli_over_two_processes(pod, killed, tmp_path):
    """qwen3-jax-export restores the params sharded over both processes' devices and gathers layer by layer."""
    out = killed[0]
    codes = _run2(pod["root"], "export", "export", ["--checkpoint", str(out), "--out", str(tmp_path / "hf")])
    assert codes == [0, 0], _logs(pod["root"], "export")
    a, b = _tensors(out / "hf"), _tensors(tmp_path / "hf")
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_infer_over_two_processes_writes_each_id_once(pod, tmp_path):
    from qwen3_jax.infer import cli

    root, model = pod["root"], pod["model"]
    lines = [{"id": f"r{i}", "prompt_token_ids": [(7 * i) % 500 + 1] * (1 + i % 4)} for i in range(10)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"id": "bad", "prompt_token_ids": [99999]}\n')
    flags = ["--model", model, "--input", str(inp), "--max-new-tokens", "5", "--temperature", "0", "--batch-size", "4",
             "--no-progress"]
    ref = tmp_path / "one.jsonl"
    assert cli.main([*flags, "--output", str(ref)]) == 1  # one process, one device; 1: the bad line
    ref_records = [json.loads(x) for x in ref.read_text().splitlines()]
    # a resumed output: three results already there (process 0 reads the file and tells process 1)
    out = tmp_path / "two.jsonl"
    done = [r for r in ref_records if r.get("id") in ("r1", "r4", "r7")]
    out.write_text("".join(json.dumps(r) + "\n" for r in done))
    codes = _run2(root, "infer", "infer", [*flags, "--output", str(out), "--routing-stats", str(tmp_path / "rs")],
                  "--read-log", str(tmp_path / "read-{}.json"))
    assert codes == [1, 1], _logs(root, "infer")
    records = [json.loads(x) for x in out.read_text().splitlines()]
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == 11 and set(ids) == {x["id"] for x in lines} | {"bad"}
    (bad,) = [r for r in records if r["id"] == "bad"]
    assert bad["line"] == 11 and "outside the vocabulary" in bad["error"]
    by_id = {r["id"]: r for r in ref_records}
    for r in records:
        assert r.get("token_ids") == by_id[r["id"]].get("token_ids"), r["id"]
    # --routing-stats: the requests this run generated (not the resumed ones), captured on both, written once
    ran = [x for x in lines if x["id"] not in ("r1", "r4", "r7")]
    stats = json.load(open(tmp_path / "rs" / "stats.json"))
    assert stats["tokens"] == sum(len(x["prompt_token_ids"]) + len(by_id[x["id"]]["token_ids"]) - 1 for x in ran)
    assert stats["sequences"] == len(ran)
    # the model is spread over both hosts (every device on 'tensor'): each read half of every expert's columns
    sizes = {k: v.nbytes for k, v in _tensors(model).items()}
    experts = [k for k in sizes if ".experts." in k]
    for i in range(2):
        read = json.load(open(tmp_path / f"read-{i}.json"))
        assert sum(read.get(k, 0) for k in experts) == sum(sizes[k] for k in experts) // 2


# ------------------------------------------------------------------------------------------ launch flags
def test_launch_flags_are_checked_before_anything_starts(pod, tmp_path, capsys):
    from qwen3_jax.train.cli import main

    out = tmp_path / "o"
    base = [*pod["flags"], "--output", str(out)]
    for extra, why in ((["--coordinator", "127.0.0.1:1234"], "needs --num-processes and --process-id too"),
                       (["--num-processes", "2", "--process-id", "2", "--coordinator", "h:1"], "must be in 0..1"),
                       (["--num-processes", "0"], "must be >= 1"),
                       (["--coordinator", "no-port", "--num-processes", "2", "--process-id", "0"], "HOST:PORT")):
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("qwen3-jax-train: error: ") and why in err[0], err
    assert not out.exists()


def test_cluster_auto_detection(monkeypatch):
    import jax

    from qwen3_jax.sharding.mesh import detect_cluster, initialize

    for k in [k for k in os.environ if k.startswith(("SLURM_", "OMPI_", "TPU_", "MEGASCALE_"))]:
        monkeypatch.delenv(k)
    assert detect_cluster() is None
    assert initialize() == (0, 1) and not jax.distributed.is_initialized()  # a plain machine: one process
    assert initialize(num_processes=1) == (0, 1) and not jax.distributed.is_initialized()
    for k, v in {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
                 "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "node[1-2]"}.items():
        monkeypatch.setenv(k, v)
    assert detect_cluster() == "slurm"  # srun's job step: jax.distributed.initialize() reads it


def test_lora_over_two_processes_equals_one(pod, tmp_path):
    """qwen3-jax-train --lora-rank on 2 processes (adapters, their optimizer state and the dropout masks spread over
    both hosts' devices; the routing capture on the merged model) logs the single process's losses and exports the
    same PEFT adapter; qwen3-jax-export --merge-lora over 2 processes writes the merged checkpoint one process writes."""
    from safetensors.numpy import load_file

    from qwen3_jax.train.cli import export_main, main

    lora = ["--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0.1", "--steps", "4"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*pod["flags"], *lora, "--output", str(one), "--export-hf", str(one / "ad")]) == 1  # the bad record
    codes = _run2(pod["root"], "lora", "train", [*pod["flags"], *lora, "--output", str(two), "--export-hf",
                                                 str(two / "ad")])
    assert codes == [1, 1], _logs(pod["root"], "lora")
    ma, mb = _metrics(one), _metrics(two)
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == [1, 2, 3, 4]
    for a, b in zip(ma, mb):
        for k in ("loss", "lm_loss", "lbl", "grad_norm"):
            assert abs(a[k] - b[k]) <= 1e-5 * abs(a[k]), (a["step"], k, a[k], b[k])
    assert mb[-1]["routing_stats"] == "routing/step_4" and (two / "routing" / "step_4" / "stats.json").exists()
    a, b = (load_file(str(d / "ad" / "adapter_model.safetensors")) for d in (one, two))
    assert sorted(a) == sorted(b) and len(a) == 2 * 4 * 2
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-6, err_msg=k)
    assert export_main(["--checkpoint", str(one), "--out", str(tmp_path / "m1"), "--merge-lora"]) == 0
    codes = _run2(pod["root"], "lora-merge", "export", ["--checkpoint", str(two), "--out", str(tmp_path / "m2"),
                                                        "--merge-lora"])
    assert codes == [0, 0], _logs(pod["root"], "lora-merge")
    a, b = _tensors(tmp_path / "m1"), _tensors(tmp_path / "m2")
    assert sorted(a) == sorted(b) and len(a) > 10
    for k in a:
        np.testing.assert_allclose(b[k].astype(np.float32), a[k].astype(np.float32), rtol=0, atol=1e-3, err_msg=k)
