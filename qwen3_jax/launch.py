"""What every command line shares: the multi-process launch flags, help that shows each default once, the
one-line error, and the small cross-process exchanges a pod-slice run needs (every host runs the same
command; process 0 writes).

    p = ArgumentParser(prog="qwen3-jax-x")    # one-line usage errors, each default shown once in --help
    add_launch_args(p)
    args = p.parse_args()
    launch(p, args)              # jax.distributed (flags, or auto-detected on TPU pods / SLURM); usage errors exit 2
    model = agree(lambda: load(args), p)   # a failure on any host (its files, its memory, a usage error there):
                                           # every host exits with the same line, `prog: error: process K: ...`
"""

from __future__ import annotations

import argparse
import json
import re
import sys


class HelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to a flag's help once: not when the help already says its default, and not for
    flags without a value (switches), None or empty defaults."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if ("default" in text or action.nargs == 0 or d is None or d is argparse.SUPPRESS or isinstance(d, bool)
                or (isinstance(d, (list, tuple, str)) and not d)):
            return text
        return text + " (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with our conventions: a usage error is the one line `prog: error: message` (exit 2, no usage
    dump: `--help` has it), `--version`, and the help formatter is `HelpFormatter`."""

    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        super().__init__(*a, **kw)
        if self.add_help:
            from qwen3_jax import __version__

            self.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                              help="print the version and exit")

    def error(self, message):
        self.exit(2, error_line(self.prog, message) + "\n")


def check_bounds(p: argparse.ArgumentParser, args, **bounds):
    """Usage errors (one line, exit 2) for numbers out of range, before any work: bounds maps a dest to
    (low, high, inclusive_low) with None for no bound, e.g. batch_size=(1, None, True), lr=(0, None, False).
    A value of None (an optional flag not given) is not checked."""
    flags = {a.dest: a.option_strings[0] for a in p._actions if a.option_strings}
    for dest, (low, high, inclusive) in bounds.items():
        v = getattr(args, dest, None)
        if v is None or isinstance(v, bool):
            continue
        flag = flags.get(dest, dest)
        if not isinstance(v, (int, float)):  # e.g. a list from a --config file
            p.error(f"{flag} {v}: expected a number")
        if low is not None and (v < low if inclusive else v <= low):
            p.error(f"{flag} {v}: must be {'>=' if inclusive else '>'} {low}")
        if high is not None and v > high:
            p.error(f"{flag} {v}: must be <= {high}")


# the ranges the numeric flags shared by several tools take (see check_bounds)
AT_LEAST_1 = (1, None, True)
AT_LEAST_0 = (0, None, True)
POSITIVE = (0, None, False)


def error_line(prog: str, error) -> str:
    """`prog: error: message` on one line (a KeyError's message without its quotes)."""
    msg = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return f"{prog}: error: " + " ".join(str(msg).split())


def describe(error: BaseException) -> str:
    """An exception as one line: its message (a KeyError's without its quotes). The kinds that bad input raises
    (ValueError, OSError, KeyError) speak for themselves; any other is named by its type (`RuntimeError: ...`)."""
    msg = " ".join(str(error.args[0] if isinstance(error, KeyError) and error.args else error).split())
    if isinstance(error, (ValueError, OSError, KeyError)):
        return msg
    return f"{type(error).__name__}: {msg}" if msg else type(error).__name__


def fail(prog: str, error, code: int = 2) -> int:
    """Print the one-line error to stderr and return the exit code (2: setup / usage, 1: bad records)."""
    print(error_line(prog, error), file=sys.stderr, flush=True)
    return code


# ----------------------------------------------------------------------------------------------- platform
def default_platform() -> str | None:
    """Run on the CPU when the user chose no platform (JAX_PLATFORMS / jax_platforms) and the machine has no
    accelerator device files: jax then never starts libtpu (which the tpu and test extras install), whose start-up
    on a machine without a TPU prints errors that read like failures. Every command line calls it first.
    Returns the platform set, or None (left to jax: a TPU or GPU host, or the user's choice)."""
    import jax
    from jax._src import xla_bridge

    from qwen3_jax.kernels import host_platform

    if jax.config.jax_platforms or xla_bridge.backends_are_initialized() or host_platform() != "cpu":
        return None
    jax.config.update("jax_platforms", "cpu")
    return "cpu"


# ----------------------------------------------------------------------------------------------- launching
def add_launch_args(p: argparse.ArgumentParser):
    g = p.add_argument_group(
        "multi-process launch (pod slices, GPU clusters: the same command on every host)",
        "Without these flags the processes are found on Cloud TPU pods and under SLURM (srun) / Open MPI; "
        "elsewhere the run is one process.")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address, the same for every process")
    g.add_argument("--num-processes", type=int, metavar="N", help="number of processes (one per host)")
    g.add_argument("--process-id", type=int, metavar="I", help="this process's id, 0..N-1 (process 0 writes)")
    return g


def launch(p: argparse.ArgumentParser, args, timeout_s: int = 300) -> tuple[int, int]:
    """Start jax.distributed from the launch flags (or the detected cluster); returns (process_index, count).
    Bad flags and a coordinator that cannot be reached are usage errors (`p.error`: one line, exit 2)."""
    from qwen3_jax.sharding.mesh import detect_cluster, initialize

    c, n, i = args.coordinator, args.num_processes, args.process_id
    if n is not None and n < 1:
        p.error(f"--num-processes {n}: must be >= 1")
    if i is not None and (i < 0 or (n is not None and i >= n)):
        p.error(f"--process-id {i}: must be in 0..{(n or 1) - 1}")
    if c is not None and not re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[^\s:\[\]]+):\d{1,5}", c):
        p.error(f"--coordinator {c!r}: expected HOST:PORT, e.g. 10.0.0.1:1234")
    given = [f for f, v in (("--coordinator", c), ("--num-processes", n), ("--process-id", i)) if v is not None]
    if given and len(given) < 3 and n != 1 and detect_cluster() is None:
        missing = sorted({"--coordinator", "--num-processes", "--process-id"} - set(given))
        p.error(f"{' '.join(given)} needs {' and '.join(missing)} too (no TPU pod, SLURM or Open MPI job "
                "was detected to provide them)")
    try:
        return initialize(c, n, i, initialization_timeout=timeout_s)
    except Exception as e:  # noqa: BLE001  (unreachable coordinator, timeouts, a second initialize)
        p.error(f"could not start the multi-process run ({' '.join(given) or 'auto-detected'}): "
                + " ".join(str(e).split())[:300])


# ----------------------------------------------------------------------------------------------- exchanges
def allgather_json(obj) -> list:
    """Every process's JSON-able `obj`, in process order (a collective: every process must call it)."""
    import jax

    if jax.process_count() == 1:
        return [obj]
    import numpy as np
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int64(len(data)))).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[:len(data)] = data
    rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
    return [json.loads(bytes(r[:s]).decode()) for r, s in zip(rows, sizes)]


class AgreedError(Exception):
    """Raised by `agree` on every process when the step failed on one of them: the same message everywhere,
    `process K: <error>` (K: the first process that failed). `kind`: the class name of that process's exception."""

    def __init__(self, message: str, kind: str = "Exception"):
        super().__init__(message)
        self.kind = kind


class _UsageError(Exception):
    """A parser's usage error inside an agreed step (see `agree`)."""


def agree(fn, parser=None):
    """fn() on every process of a multi-process run, then one exchange: when fn raised on any process (any
    Exception), every process raises AgreedError with the first failing process's error, `process K: ...`, instead
    of the others going on to wait for it in their next collective. Put every step that can fail on one host only
    (its files, its memory) inside one, before the next collective. parser: an ArgumentParser whose usage errors
    (parser.error) inside fn count too; then every process exits through parser.error with the agreed line (one
    line, exit 2). In a one-process run: fn() as it is."""
    import jax

    if jax.process_count() == 1:
        return fn()

    def usage(message):
        raise _UsageError(message)

    out, mine, cause = None, None, None
    if parser is not None:
        parser.error = usage
    try:
        out = fn()
    except _UsageError as e:
        mine = {"msg": " ".join(str(e).split()), "kind": "usage"}
    except Exception as e:  # noqa: BLE001  (any failure on this host: the others must hear of it)
        mine, cause = {"msg": describe(e), "kind": type(e).__name__}, e
    finally:
        if parser is not None:
            del parser.error  # the class's method again
    for k, err in enumerate(allgather_json(mine)):
        if err is not None:
            if parser is not None:
                parser.error(f"process {k}: {err['msg']}")
            raise AgreedError(f"process {k}: {err['msg']}", err["kind"]) from cause
    return out
