"""`python -m tests._train_slow ARGS...`: qwen3-jax-train with a pause before every step, so that a test can
SIGKILL it mid-run at a known point."""

import sys
import time

from qwen3_jax.train import cli, trainer

_global_batch = trainer.global_batch


def _slow_global_batch(*a, **kw):
    time.sleep(0.5)
    return _global_batch(*a, **kw)


trainer.global_batch = _slow_global_batch

if __name__ == "__main__":
    raise SystemExit(cli.main(sys.argv[1:]))
