"""qwen3-jax-plot OUTPUT [--out PNG]: loss, lbl, lr and per-layer expert-load spread from metrics.jsonl."""

from __future__ import annotations

import argparse
import json
import os
import sys


def read_metrics(output: str) -> list[dict]:
    path = output if output.endswith(".jsonl") else os.path.join(output, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def plot(rows: list[dict], png: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    ax[0, 0].plot(steps, [r["loss"] for r in rows], label="loss")
    ax[0, 0].plot(steps, [r["lm_loss"] for r in rows], label="lm_loss")
    ev = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if ev:
        ax[0, 0].plot(*zip(*ev), "o-", label="eval_loss")
    ax[0, 0].set_title("loss")
    ax[0, 0].legend()
    ax[0, 1].plot(steps, [r["lbl"] for r in rows])
    ax[0, 1].axhline(1.0, color="gray", lw=0.5, ls="--")
    ax[0, 1].set_title("load-balancing loss (1 = balanced)")
    ax[1, 0].plot(steps, [r["lr"] for r in rows])
    ax[1, 0].set_title("learning rate")
    load = [r.get("expert_load") for r in rows]
    if any(load):
        spread = np.array([np.array(l["max"]) / np.maximum(np.array(l["min"]), 1e-9) if l else np.nan for l in load])
        im = ax[1, 1].imshow(np.log2(np.clip(spread, 1, None)).T, aspect="auto", origin="lower", cmap="viridis",
                             extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, spread.shape[1] - 0.5))
        fig.colorbar(im, ax=ax[1, 1], label="log2(max / min expert load)")
        ax[1, 1].set_ylabel("MoE layer")
    ax[1, 1].set_title("expert-load spread per layer")
    for a in ax.flat:
        a.set_xlabel("step")
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="qwen3-jax-plot", description=__doc__)
    p.add_argument("output", help="a training --output directory (or its metrics.jsonl)")
    p.add_argument("--out", help="PNG path (default: OUTPUT/metrics.png)")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        rows = read_metrics(args.output)
    except FileNotFoundError as e:
        print(f"qwen3-jax-plot: error: {e}", file=sys.stderr)
        return 1
    if not rows:
        print("qwen3-jax-plot: error: no metrics yet", file=sys.stderr)
        return 1
    base = args.output if os.path.isdir(args.output) else os.path.dirname(args.output)
    print(plot(rows, args.out or os.path.join(base, "metrics.png")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
