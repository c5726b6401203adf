"""Multi-host runs fail together: 2 processes x 4 simulated CPU devices (jax.distributed, gloo) where one host meets
a bad file of its own or an exception that is not bad input (a RuntimeError, as running out of memory would raise):
both processes exit 2 with the same one-line `<prog>: error: process 1: ...`, none waits in a collective for the
other, and nothing is written. Each command has a timeout (a hang guard, not a speed check). Also: qwen3-jax-infer
with the decode batch split across the hosts (the engine's outputs leave the program replicated, so every host
reads every row) writes the tokens of one process."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import qwen3_jax
from tests.test_multihost import ROOT, TINY, _finish, _logs


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model, training data, prompts, a good and a damaged tokenizer, a copy of the model with a damaged
    safetensors file."""
    import shutil

    from flax import nnx
    from tokenizers import Tokenizer, models

    root = tmp_path_factory.mktemp("fail")
    cfg = qwen3_jax.Qwen3Config(**TINY)
    qwen3_jax.save_pretrained(qwen3_jax.Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0)), root / "model")
    shutil.copytree(root / "model", root / "damaged")
    (st,) = (root / "damaged").glob("*.safetensors")
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])                 # truncated on this host's disk
    (root / "tok").mkdir()
    Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(root / "tok" / "tokenizer.json"))
    (root / "badtok").mkdir()
    (root / "badtok" / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": 3')
    (root / "train.jsonl").write_text("".join(json.dumps({"input_ids": [10 + (i + j) % 40 for j in range(20)]}) + "\n"
                                              for i in range(16)))
    (root / "in.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "prompt_token_ids": [(7 * i) % 500 + 1] * (1 + i % 3)})
                                           + "\n" for i in range(8)))
    return root


def _start_each(root, name, command, args_of, *extra):
    """Both processes of one command, process i with the arguments args_of(i) (its own files); logs as
    tests.test_multihost._start."""
    import portpicker

    port = portpicker.pick_unused_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = []
    for i in range(2):
        log = open(root / f"{name}-{i}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests._pod_worker", *extra, command, *args_of(i), "--coordinator",
             f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)], cwd=ROOT, env=env, stdout=log,
            stderr=subprocess.STDOUT))
        log.close()
    return procs


def _both_fail_alike(root, name, procs, prog, *wanted):
    """Both exit 2, each with exactly one `prog: error:` line, the same on both, naming process 1 and `wanted`."""
    codes = _finish(root, name, procs)
    assert codes == [2, 2], _logs(root, name)
    lines = [[ln for ln in (root / f"{name}-{i}.log").read_text().splitlines() if ln.startswith(f"{prog}: error:")]
             for i in range(2)]
    assert len(lines[0]) == len(lines[1]) == 1 and lines[0] == lines[1], _logs(root, name)
    assert lines[0][0].startswith(f"{prog}: error: process 1: "), lines
    for w in wanted:
        assert w in lines[0][0], lines
    return lines[0][0]


def _infer_flags(files, out):
    return ["--model", str(files / "model"), "--input", str(files / "in.jsonl"), "--output", str(out),
            "--max-new-tokens", "3", "--temperature", "0", "--batch-size", "4", "--no-progress"]


def test_infer_bad_tokenizer_file_on_one_host_stops_both(files, tmp_path):
    """Host 1's tokenizer.json does not parse (tokenizers raises a plain Exception, not a ValueError)."""
    out = tmp_path / "out.jsonl"
    procs = _start_each(files, "badtok", "infer",
                        lambda i: [*_infer_flags(files, out), "--tokenizer", str(files / ("badtok" if i else "tok"))])
    _both_fail_alike(files, "badtok", procs, "qwen3-jax-infer", f"--tokenizer {files / 'badtok'}: cannot load "
                     "tokenizer.json")
    assert not out.exists()


def test_infer_exception_on_one_host_while_loading_stops_both(files, tmp_path):
    """Host 1 fails while loading the model with an exception that is not bad input."""
    out = tmp_path / "out.jsonl"
    procs = _start_each(files, "loadfail", "infer", lambda i: _infer_flags(files, out),
                        "--fail", "qwen3_jax.infer.cli:load_model")
    _both_fail_alike(files, "loadfail", procs, "qwen3-jax-infer",
                     "RuntimeError: injected failure in load_model on this host")
    assert not out.exists()


def _train_flags(files, model, out):
    return ["--model", str(model), "--data", str(files / "train.jsonl"), "--output", str(out), "--batch-size", "8",
            "--seq-len", "32", "--steps", "2", "--mesh", "data=2,expert=4", "--no-progress"]


def test_train_exception_on_one_host_stops_both(files, tmp_path):
    out = tmp_path / "run"
    procs = _start_each(files, "trainfail", "train", lambda i: _train_flags(files, files / "model", out),
                        "--fail", "qwen3_jax.train.trainer:build_model")
    _both_fail_alike(files, "trainfail", procs, "qwen3-jax-train",
                     "RuntimeError: injected failure in build_model on this host")
    assert not out.exists()


def test_train_bad_checkpoint_file_on_one_host_stops_both(files, tmp_path):
    """Host 1's copy of the checkpoint is truncated."""
    out = tmp_path / "run"
    procs = _start_each(files, "traindamaged", "train",
                        lambda i: _train_flags(files, files / ("damaged" if i else "model"), out))
    _both_fail_alike(files, "traindamaged", procs, "qwen3-jax-train", str(files / "damaged"))
    assert not out.exists()


def test_routing_capture_missing_file_on_one_host_stops_both(files, tmp_path):
    """qwen3-jax-routing capture: host 1 has no such --data file (a usage error on that host only)."""
    out = tmp_path / "cap"
    procs = _start_each(files, "routing", "routing", lambda i: [
        "capture", "--model", str(files / "model"), "--data", str(files / ("train.jsonl" if i == 0 else "gone.jsonl")),
        "--output", str(out)])
    _both_fail_alike(files, "routing", procs, "qwen3-jax-routing capture", f"--data {files / 'gone.jsonl'}: no such file")
    assert not out.exists()


def test_infer_with_the_batch_split_across_hosts_equals_one_process(files, tmp_path):
    """--mesh data=2,expert=4 over 2 processes: each host runs half of every batch's rows; the engine's tokens and
    finish reasons leave the program replicated, so process 0 writes every row, as one process does."""
    from qwen3_jax.infer import cli

    ref = tmp_path / "one.jsonl"
    assert cli.main(_infer_flags(files, ref)) == 0
    out = tmp_path / "two.jsonl"
    procs = _start_each(files, "split", "infer", lambda i: [*_infer_flags(files, out), "--mesh", "data=2,expert=4"])
    assert _finish(files, "split", procs) == [0, 0], _logs(files, "split")
    got = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    want = {r["id"]: r for r in map(json.loads, ref.read_text().splitlines())}
    assert sorted(got) == sorted(want) and len(got) == 8
    for i, r in want.items():
        assert (got[i]["token_ids"], got[i]["finish_reason"]) == (r["token_ids"], r["finish_reason"]), i
    assert np.mean([len(r["token_ids"]) for r in got.values()]) == 3
