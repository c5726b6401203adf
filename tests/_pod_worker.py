"""One process of a multi-process command line in tests/test_multihost.py (run by the test, not by pytest).

    python -m tests._pod_worker [--hold-at N] [--read-log FILE] [--fail MODULE:NAME] train|infer|export|routing ARGS...

Four simulated CPU devices per process (set before jax is imported); ARGS carry the launch flags
(--coordinator, --num-processes, --process-id). The command's exit code is this process's.
--hold-at N: at the N-th training step's metrics the process writes `<--output>/held-<process id>` and waits
there to be killed, a deterministic point mid-run for a SIGKILL. --read-log FILE: at exit, the bytes of
checkpoint tensors this process read, per tensor name (json; "{}" in FILE becomes the process id).
--fail MODULE:NAME: in process 1 only, calling MODULE.NAME raises a RuntimeError (a failure that is not bad
input, e.g. running out of memory while loading, on one host).
"""

import json
import os
import sys
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"


def _take(argv, flag):
    if flag in argv:
        i = argv.index(flag)
        value = argv[i + 1]
        del argv[i:i + 2]
        return value
    return None


def main(argv):
    hold_at, read_log, fail = _take(argv, "--hold-at"), _take(argv, "--read-log"), _take(argv, "--fail")
    command, args = argv[0], argv[1:]
    if fail and args[args.index("--process-id") + 1] == "1":
        import importlib

        module, name = fail.split(":")

        def failing(*a, **kw):
            raise RuntimeError(f"injected failure in {name} on this host")

        setattr(importlib.import_module(module), name, failing)
    if read_log:
        from qwen3_jax import checkpoint

        read_bytes: dict = {}
        real_read = checkpoint._Reader.read

        def counting_read(self, requests):
            out = real_read(self, requests)
            for (name, _), x in zip(requests, out):
                read_bytes[name] = read_bytes.get(name, 0) + x.nbytes
            return out

        checkpoint._Reader.read = counting_read
    if hold_at:
        import jax

        from qwen3_jax.train import trainer

        output = args[args.index("--output") + 1]
        real_metrics, calls = trainer.host_metrics, []

        def holding_metrics(m):
            calls.append(1)
            if len(calls) == int(hold_at):
                with open(os.path.join(output, f"held-{jax.process_index()}"), "w"):
                    pass
                while True:  # until the test's SIGKILL
                    time.sleep(1)
            return real_metrics(m)

        trainer.host_metrics = holding_metrics
    if command == "train":
        from qwen3_jax.train.cli import main as run
    elif command == "export":
        from qwen3_jax.train.cli import export_main as run
    elif command == "routing":
        from qwen3_jax.routing.cli import main as run
    else:
        from qwen3_jax.infer.cli import main as run
    try:
        rc = run(args)
    except SystemExit as e:  # qwen3-jax-infer's usage errors
        rc = e.code
    if read_log:
        import jax

        with open(read_log.format(jax.process_index()), "w") as f:
            json.dump(read_bytes, f)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
