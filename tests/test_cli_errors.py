"""Every command line fails the same way, as a new user meets it: a setup error (missing or truncated checkpoint, a
missing config key, a bad flag) is one line `<prog>: error: ...` on stderr, no traceback, exit 2, and nothing
half-made on disk; --version everywhere; no libtpu noise on a machine without a TPU; help shows each default once;
the plot's expert-load panel; the console's eval_loss column; export file modes."""

import importlib.metadata
import json
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

import qwen3_jax
from qwen3_jax import aot
from qwen3_jax import cli as demo_cli
from qwen3_jax.infer import chat_cli
from qwen3_jax.infer import cli as infer_cli
from qwen3_jax.infer import server as serve_cli
from qwen3_jax.kernels import accelerator_present
from qwen3_jax.routing import cli as routing_cli
from qwen3_jax.sharding import plan as plan_cli
from qwen3_jax.train import cli as train_cli
from qwen3_jax.train import plot as plot_cli
from qwen3_jax.train import trainer

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2,
            max_position_embeddings=64, torch_dtype="float32")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{"good", "truncated" (model.safetensors cut in half), "no_key" (config.json without num_experts)} dirs, and
    a jsonl of 4 records."""
    root = tmp_path_factory.mktemp("cli_errors")
    good = root / "good"
    qwen3_jax.save_pretrained(qwen3_jax.Qwen3ForCausalLM(qwen3_jax.Qwen3Config(**TINY), rngs=nnx.Rngs(0)), good)
    shutil.copytree(good, root / "truncated")
    f = root / "truncated" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    shutil.copytree(good, root / "no_key")
    cfg = json.loads((root / "no_key" / "config.json").read_text())
    del cfg["num_experts"]
    (root / "no_key" / "config.json").write_text(json.dumps(cfg))
    (root / "data.jsonl").write_text("".join(json.dumps({"input_ids": [1, 2, 3, 4 + i]}) + "\n" for i in range(4)))
    return {k: str(root / k) for k in ("good", "truncated", "no_key")} | {"data": str(root / "data.jsonl")}


def _code(fn, argv) -> int:
    try:
        return fn(argv)
    except SystemExit as e:  # qwen3-jax-infer / -chat exit through argparse
        return e.code


def _one_line(capsys, prog: str, *words) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err[0] and all(w in err[0] for w in words), err
    return err[0]


@pytest.mark.parametrize("case, words", [("truncated", ("model.safetensors", "truncated")),
                                         ("no_key", ("required key 'num_experts' is missing",))])
def test_bad_checkpoint_is_one_line_exit_2_everywhere(models, tmp_path, capsys, case, words):
    out = tmp_path / "run"
    assert _code(train_cli.main, ["--model", models[case], "--data", models["data"], "--output", str(out),
                                  "--steps", "1", "--batch-size", "2", "--seq-len", "8", "--no-progress"]) == 2
    _one_line(capsys, "qwen3-jax-train", *words)
    assert not out.exists()  # a failed start leaves no half-made run directory
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": 1, "prompt_token_ids": [1, 2]}) + "\n")
    assert _code(infer_cli.main, ["--model", models[case], "--input", str(inp), "--output", str(out / "o.jsonl")]) == 2
    _one_line(capsys, "qwen3-jax-infer", *words)
    assert not out.exists()
    assert _code(chat_cli.main, ["--model", models[case]]) == 2
    _one_line(capsys, "qwen3-jax-chat", *words)


def test_missing_things_and_bad_flags_are_one_line_exit_2(models, tmp_path, capsys):
    run = ["--data", models["data"], "--output", str(tmp_path / "run"), "--steps", "1", "--no-progress"]
    missing = str(tmp_path / "nowhere")
    bad_tok = tmp_path / "bad_tokenizer"
    bad_tok.mkdir()
    (bad_tok / "tokenizer.json").write_text("{not json")
    cases = [
        (train_cli.main, ["--model", missing, *run], "qwen3-jax-train", "not a checkpoint directory nor a preset"),
        (train_cli.main, ["--model", models["good"], *run, "--bogus"], "qwen3-jax-train", "--bogus"),
        (train_cli.main, ["--model", models["good"], *run, "--lr", "fast"], "qwen3-jax-train", "--lr"),
        (train_cli.main, ["--config", missing], "qwen3-jax-train", "--config"),
        (train_cli.main, ["--model", models["good"], "--data", missing, "--output", str(tmp_path / "run")],
         "qwen3-jax-train", "nowhere"),
        (train_cli.export_main, ["--checkpoint", missing, "--out", str(tmp_path / "hf")], "qwen3-jax-export",
         "no checkpoints directory"),
        (train_cli.export_main, ["--checkpoint", models["good"]], "qwen3-jax-export", "--out"),
        (infer_cli.main, ["--model", missing, "--input", models["data"], "--output", str(tmp_path / "o.jsonl")],
         "qwen3-jax-infer", "no config.json"),
        (infer_cli.main, ["--model", models["good"], "--input", models["data"], "--output", str(tmp_path / "o.jsonl"),
                          "--temperature"], "qwen3-jax-infer", "--temperature"),
        (chat_cli.main, ["--model", models["good"], "--top-k", "x"], "qwen3-jax-chat", "--top-k"),
        # qwen3-jax-infer's --top-k is the router's: a sampling-style value says where the sampling top-k went
        (infer_cli.main, ["--model", models["good"], "--input", models["data"], "--output", str(tmp_path / "o.jsonl"),
                          "--top-k", "20"], "qwen3-jax-infer", "1..4", "--sampling-top-k"),
        (plot_cli.main, [missing], "qwen3-jax-plot", "no metrics.jsonl"),
        (serve_cli.main, ["--model", models["good"], "--tokenizer", str(bad_tok), "--port", "0"], "qwen3-jax-serve",
         "cannot load tokenizer.json"),
        (demo_cli.main, ["demo", "--steps", "many"], "qwen3-jax demo", "--steps"),
    ]
    for fn, argv, prog, *why in cases:
        assert _code(fn, argv) == 2, argv
        _one_line(capsys, prog, *why)
    assert not (tmp_path / "run").exists() and not (tmp_path / "o.jsonl").exists() and not (tmp_path / "hf").exists()
    # an orbax run directory without a checkpoint of the asked step
    (tmp_path / "r" / "model").mkdir(parents=True)
    qwen3_jax.Qwen3Config(**TINY).save_pretrained(tmp_path / "r" / "model")
    (tmp_path / "r" / "checkpoints").mkdir()
    assert train_cli.export_main(["--checkpoint", str(tmp_path / "r"), "--out", str(tmp_path / "hf")]) == 2
    _one_line(capsys, "qwen3-jax-export", "no checkpoint in")
    assert not (tmp_path / "hf").exists()


def test_usage_mistakes_are_one_line_before_any_work(models, tmp_path, capsys):
    """Each usage mistake a new user makes (issue 24): one line `<prog>: error: ...`, exit 2, before any work, and
    nothing left on disk."""
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory\n")
    demo_out, run = tmp_path / "demo", tmp_path / "run"
    train = ["--model", models["good"], "--data", models["data"], "--output", str(run), "--no-progress"]
    demo_config = tmp_path / "demo_config"
    qwen3_jax.Qwen3Config.from_dict(demo_cli.DEMO_CONFIG).save_pretrained(demo_config)
    (tmp_path / "plot").mkdir()
    (tmp_path / "plot" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    compile_demo = ["--config", str(demo_config), "--topology", "v5e:2x4", "--mesh", "expert=8", "--batch-size", "8",
                    "--seq-len", "128", "--no-flops"]
    cases = [
        # (entry point, argv, prog, words of the error line)
        (demo_cli.main, ["params", "Qwen3-31B-A3B"], "qwen3-jax params", ("unknown preset Qwen3-31B-A3B",
                                                                          "Qwen3-30B-A3B")),
        (demo_cli.main, ["demo", "--out", str(a_file)], "qwen3-jax demo", ("--out", "not a directory")),
        (demo_cli.main, ["demo", "--out", str(demo_out), "--steps", "0"], "qwen3-jax demo", ("--steps 0", ">= 1")),
        (demo_cli.main, ["demo", "--out", str(demo_out), "--batch-size", "0"], "qwen3-jax demo", ("--batch-size 0",)),
        (demo_cli.main, ["demo", "--out", str(demo_out), "--seq-len", "0"], "qwen3-jax demo", ("--seq-len 0",)),
        (train_cli.main, [*train, "--steps", "0"], "qwen3-jax-train", ("--steps 0", ">= 1")),
        (train_cli.main, [*train, "--batch-size", "0"], "qwen3-jax-train", ("--batch-size 0", ">= 1")),
        (train_cli.main, [*train, "--seq-len", "0"], "qwen3-jax-train", ("--seq-len 0", ">= 1")),
        (train_cli.main, [*train, "--lr", "-1"], "qwen3-jax-train", ("--lr -1.0", "> 0")),
        (train_cli.main, [*train, "--batch-size", "6", "--grad-accum", "4"], "qwen3-jax-train", ("--grad-accum 4",)),
        (plan_cli.main, ["--batch", "0"], "qwen3-jax-plan", ("--batch-size 0", ">= 1")),
        (plan_cli.main, ["--seq", "0"], "qwen3-jax-plan", ("--seq-len 0",)),
        (plan_cli.main, ["--preset", "Qwen3-31B-A3B"], "qwen3-jax-plan", ("unknown preset 'Qwen3-31B-A3B'",)),
        (plan_cli.main, ["--mesh", "expert=8,pipeline=2"], "qwen3-jax-plan", ("--mesh expert=8,pipeline=2",)),
        (aot.main, ["--preset", "Qwen3-31B-A3B"], "qwen3-jax-compile", ("unknown preset 'Qwen3-31B-A3B'",)),
        (aot.main, ["--batch", "0"], "qwen3-jax-compile", ("--batch-size 0",)),
        # the demo's own model: megablox cannot tile moe_intermediate_size 64 in the backward (checked, not compiled)
        (aot.main, compile_demo, "qwen3-jax-compile", ("moe_intermediate_size 64", "multiple of 128",
                                                       "--program decode")),
        (plot_cli.main, [models["data"]], "qwen3-jax-plot", ("not a metrics.jsonl", "line 1", "step")),
        (plot_cli.main, [str(tmp_path / "plot")], "qwen3-jax-plot", ("not a metrics.jsonl", "lbl")),
        (plot_cli.main, [str(tmp_path / "plot"), "--out", str(tmp_path / "nowhere" / "m.png")], "qwen3-jax-plot",
         ("--out", "no such directory")),
    ]
    for fn, argv, prog, words in cases:
        assert _code(fn, argv) == 2, argv
        line = _one_line(capsys, prog, *words)
        assert '"' not in line, line  # no stray quotes from a KeyError
    assert not demo_out.exists() and not run.exists() and not (tmp_path / "nowhere").exists()
    assert a_file.read_text() == "not a directory\n" and os.listdir(tmp_path / "plot") == ["metrics.jsonl"]


def _entry_points():
    dist = importlib.metadata.distribution("qwen3-jax")
    return {ep.name: ep.load() for ep in dist.entry_points if ep.group == "console_scripts"}


def test_every_cli_has_version(capsys):
    eps = _entry_points()
    assert set(eps) == {"qwen3-jax", "qwen3-jax-plan", "qwen3-jax-compile", "qwen3-jax-train", "qwen3-jax-export",
                        "qwen3-jax-plot", "qwen3-jax-infer", "qwen3-jax-chat", "qwen3-jax-routing", "qwen3-jax-serve"}
    for name, fn in eps.items():
        assert _code(fn, ["--version"]) in (0, None), name
        assert capsys.readouterr().out.strip() == f"{name} {qwen3_jax.__version__}", name


def test_routing_compare_prints_where_it_wrote(tmp_path, capsys):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "stats.json").write_text(json.dumps({"num_experts": 4, "layers": [{"top_k": 2}]}))
        np.savez(tmp_path / d / "trace.npz", layers=np.array([0]), token_ids=np.arange(3),
                 routed_experts=np.array([[[0, 1]], [[2, 3]], [[1, 2]]], np.int16), record=np.zeros(3, np.int32),
                 position=np.arange(3, dtype=np.int32))
    assert routing_cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    where = tmp_path / "b" / "compare"
    assert f"{where / 'compare.json'}" in out and f"{where / 'compare.png'}" in out
    assert (where / "compare.json").is_file() and (where / "compare.png").is_file()


def test_console_table_has_eval_loss():
    rows = [{"step": s, "loss": 2.0, "lm_loss": 2.0, "lbl": 1.0, "grad_norm": 1.0, "lr": 1e-3, "tokens_per_s": 10.0}
            for s in range(1, 31)]
    rows[16]["eval_loss"] = 1.2345   # a save step that the table's every-other-row sampling would leave out
    rows[-1]["eval_loss"] = 1.5
    lines = trainer.summary(rows).splitlines()
    assert lines[0].split()[:4] == ["step", "loss", "lm_loss", "eval_loss"]
    by_step = {int(line.split()[0]): line for line in lines[1:]}
    assert by_step[17].split()[3] == "1.2345" and by_step[30].split()[3] == "1.5000"
    assert by_step[1].split()[3] == "1.0000"  # no eval here: the column is blank, the next one is lbl
    assert "eval_loss" not in trainer.summary([{k: v for k, v in r.items() if k != "eval_loss"} for r in rows])


def test_exported_files_are_world_readable(tmp_path):
    old = os.umask(0o022)
    try:
        qwen3_jax.save_pretrained(qwen3_jax.Qwen3ForCausalLM(qwen3_jax.Qwen3Config(**TINY), rngs=nnx.Rngs(0)),
                                  tmp_path / "hf")
    finally:
        os.umask(old)
    for f in os.listdir(tmp_path / "hf"):
        assert stat.S_IMODE(os.stat(tmp_path / "hf" / f).st_mode) == 0o644, f


@pytest.mark.skipif(accelerator_present() is not None, reason="checks a machine without an accelerator")
def test_no_libtpu_noise_without_a_tpu(models, tmp_path):
    """With libtpu installed (the test extra) and no platform chosen, a CLI picks the CPU from the devices present
    and prints nothing of libtpu's; the compile tool loads libtpu for its compiler, quietly too."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": 1, "prompt_token_ids": [1, 2]}) + "\n")
    res = subprocess.run([sys.executable, "-m", "qwen3_jax.infer.cli", "--model", models["good"], "--input",
                          str(inp), "--output", str(tmp_path / "o.jsonl"), "--max-new-tokens", "2", "--no-progress"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [line for line in res.stderr.splitlines() if not line.startswith("loaded ")] == [], res.stderr[-3000:]
    demo_config = tmp_path / "demo_config"
    qwen3_jax.Qwen3Config.from_dict(demo_cli.DEMO_CONFIG).save_pretrained(demo_config)
    res = subprocess.run([sys.executable, "-m", "qwen3_jax.aot", "--config", str(demo_config), "--topology", "v5e:2x4",
                          "--mesh", "expert=8"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.startswith("qwen3-jax-compile: error: moe_intermediate_size 64") and res.stderr.count("\n") == 1, \
        res.stderr[-3000:]


def _parsers():
    demo = demo_cli.parser()._subparsers._group_actions[0].choices["demo"]
    from qwen3_jax.infer.server import serve_parser

    return [train_cli.parser(), infer_cli.batch_parser(), chat_cli.chat_parser(), serve_parser(), demo]


def test_help_shows_each_default_once():
    for p in _parsers():
        text = p.format_help()
        for bad in ("(default: None)", "(default: True)", "(default: False)", "(default: [])"):
            assert bad not in text, (p.prog, bad)
        fmt = p._get_formatter()
        for action in p._actions:
            help_text = (fmt._get_help_string(action) or "").replace("%(default)s", str(action.default))
            assert help_text.count("default") <= 1, (p.prog, action.dest, help_text)
    train = train_cli.parser()
    helps = {a.dest: a.help for a in train._actions}
    assert "sequence length" in helps["seq_len"] and "learning rate" in helps["lr"]
    text = " ".join(train.format_help().split())
    assert "(default: the model directory)" in text and "(default: 1024)" in text and "--coordinator HOST:PORT" in text


def test_plot_expert_load_panel_explains_its_colours():
    rows = [{"step": s, "loss": 3.0 - 0.1 * s, "lm_loss": 3.0 - 0.1 * s, "lbl": 1.1, "lr": 1e-3,
             "expert_load": {"max": [0.5, 0.3, 0.26], "min": [0.0 if s < 3 else 0.1, 0.2, 0.24],
                             "cv": [1.1 - 0.1 * s, 0.3, 0.05]}} for s in range(1, 6)]
    fig = plot_cli.figure(rows)
    panel = fig.axes[3]
    ticks = [t for t in panel.get_yticks() if panel.get_ylim()[0] <= t <= panel.get_ylim()[1]]
    assert ticks == [0, 1, 2] and panel.get_ylabel() == "MoE layer"  # integer layer ticks
    lo, hi = panel.images[0].get_clim()
    assert lo == 0 and hi == pytest.approx(1.0)  # CV: finite although expert loads hit 0 (no saturation)
    assert "CV" in fig.axes[-1].get_ylabel() and "0 = balanced" in fig.axes[-1].get_ylabel()  # the colour bar
    idle = [line for line in panel.get_lines() if line.get_label() == "an expert got no tokens"]
    assert len(idle) == 1 and np.array_equal(idle[0].get_xdata(), [1, 2])
