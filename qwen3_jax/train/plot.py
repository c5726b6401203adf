"""qwen3-jax-plot OUTPUT [--out PNG]: loss, lbl, lr and per-layer expert-load imbalance from metrics.jsonl."""

from __future__ import annotations

import json
import os


KEYS = ("step", "loss", "lm_loss", "lbl", "lr")  # in every row of qwen3-jax-train's metrics.jsonl; the plot draws them


def read_metrics(output: str) -> list[dict]:
    path = output if os.path.isfile(output) or output.endswith(".jsonl") else os.path.join(output, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def plot(rows: list[dict], png: str) -> str:
    """Write the 2x2 figure of `figure(rows)` to `png`; returns the path."""
    import matplotlib.pyplot as plt

    fig = figure(rows)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def figure(rows: list[dict]):
    """loss / eval loss, LBL, learning rate, and per MoE layer the expert-load imbalance over the steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

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
        # colour: the coefficient of variation of the experts' loads (std / mean of the fractions of routed
        # token copies; 0 = perfectly balanced, sqrt(E - 1) = every copy to one expert): finite even when an
        # expert gets no tokens, which is marked with a dot instead
        n_layers = max(len(l["cv"]) for l in load if l)
        cv = np.array([l["cv"] if l else [np.nan] * n_layers for l in load], float)
        idle = np.array([np.asarray(l["min"]) <= 0 if l else [False] * n_layers for l in load], bool)
        im = ax[1, 1].imshow(cv.T, aspect="auto", origin="lower", cmap="viridis", vmin=0.0,
                             extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, n_layers - 0.5), interpolation="nearest")
        fig.colorbar(im, ax=ax[1, 1], label="CV of expert loads (std/mean, 0 = balanced)")
        if idle.any():
            s_idx, l_idx = np.nonzero(idle)
            ax[1, 1].plot(np.asarray(steps)[s_idx], l_idx, "o", ms=3, color="red", ls="none",
                          label="an expert got no tokens")
            ax[1, 1].legend(loc="upper right", fontsize="small")
        ax[1, 1].yaxis.set_major_locator(MaxNLocator(integer=True))
        ax[1, 1].set_ylabel("MoE layer")
    ax[1, 1].set_title("expert-load imbalance per MoE layer")
    for a in ax.flat:
        a.set_xlabel("step")
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def main(argv=None) -> int:
    from qwen3_jax.launch import ArgumentParser, fail

    p = ArgumentParser(prog="qwen3-jax-plot", description=__doc__)
    p.add_argument("output", help="a training --output directory (or its metrics.jsonl)")
    p.add_argument("--out", help="PNG path (default: OUTPUT/metrics.png)")
    try:
        args = p.parse_args(argv)
        if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
            p.error(f"--out {args.out}: no such directory {os.path.dirname(os.path.abspath(args.out))}")
        if args.out and os.path.isdir(args.out):
            p.error(f"--out {args.out}: is a directory (give the PNG file's path)")
    except SystemExit as e:
        return int(e.code or 0)
    try:
        rows = read_metrics(args.output)
    except OSError as e:
        return fail(p.prog, f"{args.output}: no metrics.jsonl ({e.strerror})", 2)
    except (ValueError, KeyError) as e:
        return fail(p.prog, f"{args.output}: not a metrics.jsonl of qwen3-jax-train ({e})", 2)
    if not rows:
        return fail(p.prog, f"{args.output}: no metrics yet", 2)
    bad = next((n for n, r in enumerate(rows, 1) if not isinstance(r, dict) or not set(KEYS) <= set(r)), None)
    if bad is not None:
        missing = sorted(set(KEYS) - set(rows[bad - 1])) if isinstance(rows[bad - 1], dict) else list(KEYS)
        return fail(p.prog, f"{args.output}: not a metrics.jsonl of qwen3-jax-train (line {bad} has no "
                    f"{', '.join(missing)})", 2)
    base = args.output if os.path.isdir(args.output) else os.path.dirname(args.output)
    print(plot(rows, args.out or os.path.join(base, "metrics.png")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
