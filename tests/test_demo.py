"""The README's first command, `qwen3-jax demo`, end to end on a few steps."""

import json
import os

from qwen3_jax import cli


def test_demo_pipeline_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--steps", "3", "--batch-size", "2", "--seq-len", "64",
                     "--max-new-tokens", "6"]) == 0
    text = capsys.readouterr().out
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]", "expert load", "done in"):
        assert step in text, step
    recs = [json.loads(line) for line in open(out / "run" / "metrics.jsonl")]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(len(r["expert_load"]["max"]) == 4 for r in recs)
    assert {"config.json", "model.safetensors"} <= set(os.listdir(out / "finetuned-hf"))
    assert os.listdir(out / "run" / "checkpoints")                      # orbax
    assert (out / "run" / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the plot of the run
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out / "base"))
    generated = text.split("prompt 'json.dumps: Serialize':\n", 1)[1].split("\n      (docstring-flavoured")[0]
    assert "gibberish: the model is random and tiny" in text
    assert generated.startswith("json.dumps: Serialize") and len(generated) > len("json.dumps: Serialize")
