"""The training run: model + mesh, data, optimizer, orbax checkpoints (auto-resume), metrics, export.

`<output>/` holds: `model/config.json` (the model's config, for export), `train_args.json`,
`checkpoints/<step>/` (orbax: params, opt_state, the data iterators' state per data shard, meta with the step
and the skipped records), `metrics.jsonl`, and with --routing-stats-every `routing/step_<step>/` (the held-out set's
routing capture, qwen3_jax.routing). On several processes (a pod slice), process 0 writes everything
but the checkpoints, which orbax writes from every process.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

import qwen3_jax
from qwen3_jax.sharding import activation_sharding, make_mesh, shard_model

from . import data as D
from .step import (StepConfig, flops_per_token, host_metrics, make_eval_step, make_optimizer, make_schedule,
                   make_train_step, model_from, opt_state_shardings, split_model)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "generation_config.json")


def parse_mesh(spec: str | None) -> dict:
    """'data=2,expert=4' -> {'data': 2, 'expert': 4}; None/'' -> all devices on data."""
    if not spec:
        return {"data": -1}
    out = {}
    for part in spec.split(","):
        k, _, v = part.partition("=")
        if k.strip() not in ("data", "fsdp", "expert", "tensor") or not v.strip().lstrip("-").isdigit():
            raise ValueError(f"--mesh {spec!r}: expected e.g. data=2,expert=4 (axes data, fsdp, expert, tensor)")
        out[k.strip()] = int(v)
    return out


def build_model(args, mesh):
    kw = dict(remat=args.remat, capacity_factor=args.capacity_factor,
              ep_buffer_factor=getattr(args, "ep_buffer_factor", 1.25) or None)
    if os.path.isdir(args.model):
        return qwen3_jax.from_pretrained(args.model, dtype=args.dtype, param_dtype=args.param_dtype, mesh=mesh, **kw)
    if args.model not in qwen3_jax.PRESETS:
        raise FileNotFoundError(f"--model {args.model!r}: not a checkpoint directory nor a preset "
                                f"({', '.join(qwen3_jax.Qwen3Config.presets())})")
    cfg = qwen3_jax.Qwen3Config.preset(args.model)
    model = qwen3_jax.Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(args.seed), dtype=jnp.dtype(args.dtype),
                                       param_dtype=jnp.dtype(args.param_dtype), **kw)
    return shard_model(model, mesh)


def tokenizer_dir(args):
    return args.tokenizer or (args.model if os.path.isdir(args.model) else None)


def lazy_tokenizer(path):
    cache = {}

    def get():
        if "tok" not in cache:
            if not path or not os.path.isfile(os.path.join(path, "tokenizer.json")):
                raise D.DataError(f"text/messages records need a tokenizer: no tokenizer.json in {path} "
                                  "(pass --tokenizer DIR, or use pre-tokenized input_ids)")
            from qwen3_jax.infer import Tokenizer

            cache["tok"] = Tokenizer.from_pretrained(path)
        return cache["tok"]
    return get


def copy_tokenizer(src, dst):
    if src and os.path.isdir(src):
        for f in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(src, f)):
                shutil.copy(os.path.join(src, f), os.path.join(dst, f))


def checkpoint_manager(output, keep):
    return ocp.CheckpointManager(os.path.abspath(os.path.join(output, "checkpoints")),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def abstract_of(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def init_opt_state(tx, params, mesh):
    """tx.init with each moment on its parameter's sharding (step.opt_state_shardings), scalars replicated."""
    out = opt_state_shardings(jax.eval_shape(tx.init, params), params, mesh)
    return jax.jit(tx.init, out_shardings=out)(params)


def truncate_metrics(path, last_step):
    """Keep the metrics lines of steps <= last_step (a killed run may have logged steps past its checkpoint)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= last_step]
    with open(path, "w") as f:
        f.writelines(keep)


def batch_shards(mesh, batch_size: int, seq_len: int) -> tuple[int, list[int], int]:
    """(K, the data shards this process feeds, rows per shard): the global batch's rows split into the K
    distinct row ranges of their sharding on the mesh; data shard k feeds rows [k*R, (k+1)*R). K depends on
    the mesh and the batch size only, so a run's data is the same on any number of processes."""
    shape = (batch_size, seq_len)
    sharding = activation_sharding("bt", shape, mesh)

    def starts(index_map):
        return {idx[0].indices(batch_size)[0] for idx in index_map.values()}

    k = len(starts(sharding.devices_indices_map(shape)))
    rows = batch_size // k
    return k, sorted(s // rows for s in starts(sharding.addressable_devices_indices_map(shape))), rows


def global_batch(host_batch: dict, mesh, batch_size: int | None = None) -> dict:
    """This host's rows (its data shards' rows, in order) -> global [batch_size, T] arrays sharded over the
    batch axes. batch_size defaults to the host's rows times the number of processes."""
    out = {}
    for k, v in host_batch.items():
        shape = (batch_size or v.shape[0] * jax.process_count(),) + v.shape[1:]
        out[k] = jax.make_array_from_process_local_data(activation_sharding("bt", shape, mesh), v, shape)
    return out


def evaluate(eval_fn, params, shards: dict, args, mesh, rows: int, n_steps: int) -> float:
    """Mean target NLL over the eval records: every process runs the same n_steps (the longest data shard's
    batch count); shards that have run out, and the last batch of each, are padded with masked rows."""
    it = D.HostBatches(shards, args.seq_len, rows, args.seed, repeat=False)
    nll = n = 0.0
    for _ in range(n_steps):
        s, c = eval_fn(params, global_batch(next(it), mesh, args.batch_size))
        nll, n = nll + float(s), n + float(c)
    return nll / max(n, 1.0)


def _host_values(tree):
    """Metrics on this host: small arrays spread over processes are gathered first."""
    from jax.experimental import multihost_utils

    return jax.tree.map(lambda x: x if x.is_fully_addressable or x.is_fully_replicated
                        else multihost_utils.process_allgather(x, tiled=True), tree)


def _on_every_process(fn):
    """fn() on every process; when it fails on one (its share of the data, its slices of the checkpoint, its
    files, its memory: any exception), every process raises the same error, `process K: ...` (DataError for bad
    records, else SetupError), instead of the others waiting for it in the next collective."""
    from qwen3_jax.launch import AgreedError, agree

    try:
        return agree(fn)
    except AgreedError as e:
        raise (D.DataError if e.kind == D.DataError.__name__ else SetupError)(str(e)) from e


def _global_sum(*values: int) -> list[int]:
    from qwen3_jax.launch import allgather_json

    return [sum(v) for v in zip(*allgather_json(list(values)))]


def _global_max(value: int) -> int:
    from qwen3_jax.launch import allgather_json

    return max(allgather_json(value))


def summary(rows: list[dict]) -> str:
    """A readable per-step table (at most ~20 rows) of loss, lbl and expert load."""
    if not rows:
        return "no steps run"
    pick = rows if len(rows) <= 20 else [rows[i] for i in sorted({*range(0, len(rows), math.ceil(len(rows) / 19)), len(rows) - 1})]
    lines = [f"{'step':>6} {'loss':>9} {'lm_loss':>9} {'lbl':>7} {'grad_norm':>9} {'lr':>9} {'tok/s':>9} "
             f"{'load max/min (worst layer)':>27} {'cv':>6}"]
    for r in pick:
        load = r.get("expert_load")
        ld = ""
        cv = ""
        if load:
            i = int(np.argmax(load["cv"]))
            ld, cv = f"{load['max'][i]:.3f}/{load['min'][i]:.3f} (L{i})", f"{load['cv'][i]:.3f}"
        lines.append(f"{r['step']:>6} {r['loss']:>9.4f} {r['lm_loss']:>9.4f} {r['lbl']:>7.4f} {r['grad_norm']:>9.3f} "
                     f"{r['lr']:>9.2e} {r['tokens_per_s']:>9.0f} {ld:>27} {cv:>6}")
    return "\n".join(lines)


def routing_records(args, cfg, tok, log) -> list:
    """--routing-data (else --eval-data) as routing.stats.Record's; every process reads all of it (the capture
    runs the same batches on every process). Bad lines are named (by process 0) and skipped."""
    from qwen3_jax.routing.cli import read_records

    if not cfg.is_moe:
        raise ValueError("--routing-stats-every: the model has no MoE layers")
    paths, flag = (args.routing_data, "--routing-data") if args.routing_data else (args.eval_data, "--eval-data")
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"{flag} {path}: no such file")
    quiet = jax.process_index() != 0
    recs, skipped = read_records(paths, tok, cfg.vocab_size, log=lambda msg, **_: quiet or log(f"skipped {msg}"))
    if not recs:
        raise D.DataError(f"{flag} {', '.join(paths)}: no usable routing records" + (
            f" ({len(skipped)} malformed, skipped)" if skipped else ""))
    return recs


class SetupError(ValueError):
    """The run could not start (model, data, mesh, flags, checkpoint); nothing was written."""


def make_run_mesh(spec: str | None):
    sizes = parse_mesh(spec)
    n_mesh = math.prod(sizes.values())
    if 0 < n_mesh < jax.device_count():
        if jax.process_count() > 1:
            raise ValueError(f"--mesh {spec}: {n_mesh} devices, but a run of {jax.process_count()} processes uses "
                             f"all {jax.device_count()} devices")
        # a mesh smaller than the machine uses its first devices (e.g. --mesh data=1 on a multi-device host)
        return make_mesh(**sizes, devices=jax.devices()[:n_mesh])
    return make_mesh(**sizes)


def train(args, log=print) -> dict:
    """Run (or resume) a training job described by the parsed CLI `args`; returns a result summary.

    Every process of a multi-process run calls it with the same args. Each reads the records of its own
    data shards only (see data.py), process 0 writes metrics.jsonl, train_args.json and the export, and
    orbax writes the checkpoints from every process. Errors before the first step raise SetupError (or
    DataError for bad records with --strict) and leave no output directory behind."""
    try:
        setup = _setup(args, log)
    except D.DataError:
        raise
    except (ValueError, OSError, KeyError) as e:
        raise SetupError(e.args[0] if isinstance(e, KeyError) and e.args else str(e)) from e
    return _run(args, log, **setup)


def _setup(args, log) -> dict:
    mesh = make_run_mesh(args.mesh)
    n_shards, local, rows = batch_shards(mesh, args.batch_size, args.seq_len)
    model = _on_every_process(lambda: build_model(args, mesh))
    cfg = model.config
    tok = lazy_tokenizer(tokenizer_dir(args))

    def read(paths):
        return D.load_corpus(paths, args.seq_len, cfg.vocab_size, tok, strict=args.strict, log=log,
                             overflow=args.overflow, shards=(local, n_shards))

    corpus = _on_every_process(lambda: read(args.data))
    eval_corpus = _on_every_process(lambda: read(args.eval_data)) if args.eval_data else None
    # counts over every process's shards, so that each process logs, stops and evaluates alike
    n_examples, skipped, long = _global_sum(len(corpus.examples), len(corpus.skipped), corpus.long)
    if not n_examples:
        raise D.DataError("no usable training records" + (f" ({skipped} malformed, skipped)" if skipped else ""))

    def passes(shards):  # batches in one pass over the longest data shard
        return _global_max(max([D.batches_per_epoch(ex, args.seq_len, rows, args.seed + k)
                                for k, ex in shards.items() if ex] or [0]))

    # --epochs: passes over the packed data (of the longest data shard)
    steps = args.steps or math.ceil(args.epochs * passes(corpus.shards))
    if not steps or steps < 1:
        raise ValueError("give --steps or --epochs")
    eval_steps = passes(eval_corpus.shards) if eval_corpus else 0
    if eval_corpus is not None and not eval_steps:
        raise D.DataError("--eval-data: no usable records")

    routing = _on_every_process(lambda: routing_records(args, cfg, tok, log)) if args.routing_stats_every else None

    graphdef, abstract_state, params = split_model(model)
    del model
    schedule = make_schedule(args.schedule, args.lr, args.warmup, steps)
    tx = make_optimizer(params, schedule=schedule, weight_decay=args.weight_decay, clip=args.clip,
                        freeze=tuple(args.freeze))
    opt_state = init_opt_state(tx, params, mesh)
    lbl_coef = cfg.router_aux_loss_coef if args.lbl_coef is None else args.lbl_coef
    scfg = StepConfig(grad_accum=args.grad_accum, lbl_coef=lbl_coef, lbl_scope=args.lbl_scope,
                      z_loss_coef=args.z_loss_coef, freeze=tuple(args.freeze))
    if args.batch_size % args.grad_accum:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by --grad-accum {args.grad_accum}")
    return dict(mesh=mesh, cfg=cfg, rows=rows, corpus=corpus, eval_corpus=eval_corpus, skipped=skipped, long=long,
                steps=steps, eval_steps=eval_steps, graphdef=graphdef, abstract_state=abstract_state, params=params,
                schedule=schedule, tx=tx, opt_state=opt_state, scfg=scfg, routing=routing)


def _run(args, log, *, mesh, cfg, rows, corpus, eval_corpus, skipped, long, steps, eval_steps, graphdef,
         abstract_state, params, schedule, tx, opt_state, scfg, routing) -> dict:
    from qwen3_jax.launch import allgather_json

    writer = jax.process_index() == 0

    def start():  # the run starts: only now its directory is made (a failed start leaves none behind)
        if not writer:
            return
        try:
            os.makedirs(os.path.join(args.output, "model"), exist_ok=True)
            cfg.save_pretrained(os.path.join(args.output, "model"))
            with open(os.path.join(args.output, "train_args.json"), "w") as f:
                json.dump(vars(args), f, indent=1)
        except OSError as e:
            raise SetupError(f"--output {args.output}: {e}") from e

    _on_every_process(start)  # process 0 cannot write there: every process stops with its error
    shardings = jax.tree.map(lambda x: x.sharding, (params, opt_state))
    train_step = make_train_step(graphdef, abstract_state, tx, schedule, scfg, shardings)

    it = D.HostBatches(corpus.shards, args.seq_len, rows, args.seed)
    mngr = checkpoint_manager(args.output, args.keep)
    metrics_path = os.path.join(args.output, "metrics.jsonl")
    start = 0
    latest = mngr.latest_step()
    opt_def = jax.tree.structure(opt_state)
    if latest is not None:
        try:
            restored = mngr.restore(latest, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_of(params)),
                opt_state=ocp.args.StandardRestore(abstract_of(jax.tree.leaves(opt_state))),
                data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
            it.set_state(restored.data)
        except (ValueError, OSError, KeyError) as e:
            raise SetupError(f"{mngr.directory}/{latest}: cannot resume from this checkpoint: {e}") from e
        params = restored.params
        opt_state = jax.tree.unflatten(opt_def, restored.opt_state)
        start = int(restored.meta["step"])  # (older checkpoints' meta also has an unused "rng": ignored)
        if writer:
            truncate_metrics(metrics_path, start)
            log(f"resumed from {mngr.directory}/{latest} at step {start}")

    saved = start

    def save(step):
        nonlocal saved
        saved = step
        state = {"shards": {k: v for part in allgather_json(it.get_state()) for k, v in part["shards"].items()}}
        mngr.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(jax.tree.leaves(opt_state)),
            data=ocp.args.JsonSave(state), meta=ocp.args.JsonSave({"step": step, "skipped_records": skipped})))

    def routing_stats(step) -> str:
        """The held-out set's routing capture under the current params (every process runs it; process 0 writes)."""
        from qwen3_jax.routing import capture

        stats = capture(model_from(graphdef, abstract_state, params), routing, batch_size=args.batch_size,
                        max_len=args.seq_len)
        stats.model_name = f"{os.path.abspath(args.output)} step {step}"
        out_dir = os.path.join(args.output, "routing", f"step_{step}")
        if writer:
            stats.save(out_dir)
        return os.path.relpath(out_dir, args.output)

    eval_fn = make_eval_step(graphdef, abstract_state) if eval_corpus else None
    active = qwen3_jax.param_count(cfg)["active"]
    fpt = flops_per_token(cfg, args.seq_len, active)
    out_rows = []
    bar = tqdm(total=steps, initial=start, desc="train", dynamic_ncols=True, disable=not (args.progress and writer))
    mf = open(metrics_path, "a") if writer else None
    try:
        for step in range(start, steps):
            t0 = time.perf_counter()
            batch = global_batch(next(it), mesh, args.batch_size)
            params, opt_state, m = train_step(params, opt_state, batch, jnp.int32(step))
            m = _host_values(m)
            row = {"step": step + 1, **host_metrics(m)}
            dt = time.perf_counter() - t0
            n_tokens = args.batch_size * args.seq_len
            row["tokens_per_s"] = n_tokens / dt
            row["real_tokens"] = int(np.asarray(m["tokens"]))
            row["mfu"] = (fpt * n_tokens / dt / (args.peak_flops * jax.device_count())) if args.peak_flops else None
            row["skipped_records"] = skipped
            row["long_records"] = long
            row["step_time_s"] = dt
            if routing is not None and (step + 1 == steps or (step + 1) % args.routing_stats_every == 0):
                row["routing_stats"] = routing_stats(step + 1)   # before the save: a resumed run redoes it
            if step + 1 == steps or (args.save_every and (step + 1) % args.save_every == 0):
                if eval_fn is not None:
                    row["eval_loss"] = evaluate(eval_fn, params, eval_corpus.shards, args, mesh, rows, eval_steps)
                save(step + 1)
            if mf is not None:
                mf.write(json.dumps(row) + "\n")
                mf.flush()
            out_rows.append(row)
            bar.update(1)
            if args.stop_after_steps and len(out_rows) >= args.stop_after_steps and step + 1 < steps:
                if saved != step + 1:
                    save(step + 1)
                if writer:
                    log(f"stopping after {len(out_rows)} steps this run (--stop-after-steps); rerun to resume")
                break
            bar.set_postfix(loss=f"{row['loss']:.4f}", lbl=f"{row['lbl']:.3f}", gn=f"{row['grad_norm']:.2f}")
    finally:
        if mf is not None:
            mf.close()
    bar.close()
    mngr.wait_until_finished()
    mngr.close()
    if args.export_hf and (out_rows[-1]["step"] if out_rows else start) == steps:  # only a finished run is exported
        export(model_from(graphdef, abstract_state, params), args.export_hf, tokenizer_dir(args))
        if writer:
            log(f"exported Hugging Face checkpoint to {args.export_hf}")
    return {"rows": out_rows, "params": params, "steps": steps, "skipped": corpus.skipped, "skipped_total": skipped}


def export(model, out, tok_dir=None):
    """Hugging Face safetensors + tokenizer files (every process calls it; process 0 writes)."""
    qwen3_jax.save_pretrained(model, out)
    if jax.process_index() == 0:
        copy_tokenizer(tok_dir, out)


def restore_params(checkpoint: str, mesh=None):
    """(config, params pure dict, step, run output dir) of an orbax step: `checkpoint` is a training --output
    directory (latest step) or one step's directory `<output>/checkpoints/<step>`. The params are restored
    straight into their shards on `mesh` (default: every device of every process on 'fsdp'), so no host
    holds the whole model."""
    checkpoint = os.path.abspath(checkpoint)
    base = os.path.basename(checkpoint.rstrip("/"))
    if base.isdigit():
        ckpt_dir, step = os.path.dirname(checkpoint), int(base)
        output = os.path.dirname(ckpt_dir)
    else:
        output, ckpt_dir, step = checkpoint, os.path.join(checkpoint, "checkpoints"), None
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"{checkpoint}: no checkpoints directory")
    cfg = qwen3_jax.Qwen3Config.from_pretrained(os.path.join(output, "model"))
    mngr = ocp.CheckpointManager(ckpt_dir)
    steps = list(mngr.all_steps())
    step = mngr.latest_step() if step is None else step
    if step is None or step not in steps:
        mngr.close()
        raise FileNotFoundError(f"no checkpoint {'' if step is None else f'of step {step} '}in {ckpt_dir}"
                                + (f" (steps: {sorted(steps)})" if steps else ""))
    meta = mngr.item_metadata(step)
    leaf = jax.tree.leaves(meta.params)[0] if meta is not None and meta.params is not None else None
    dtype = jnp.dtype(leaf.dtype) if leaf is not None else jnp.float32
    abstract = nnx.eval_shape(lambda: qwen3_jax.Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0), param_dtype=dtype))
    _, _, abstract_params = split_model(abstract)
    from qwen3_jax.sharding import param_shardings

    shardings = param_shardings(cfg, mesh if mesh is not None else make_mesh(fsdp=-1))
    target = jax.tree_util.tree_map_with_path(
        lambda kp, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings[tuple(str(k.key) for k in kp)]),
        abstract_params)
    try:
        params = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))).params
    finally:
        mngr.close()
    return cfg, params, step, output


def export_checkpoint(checkpoint: str, out: str, tokenizer: str | None = None) -> int:
    """Write the params of an orbax step as a Hugging Face checkpoint (+ the run's tokenizer files)."""
    cfg, params, step, output = restore_params(checkpoint)
    dtype = jax.tree.leaves(params)[0].dtype
    model = nnx.eval_shape(lambda: qwen3_jax.Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0), param_dtype=dtype))
    graphdef, abstract_state, _ = split_model(model)
    tok_dir = tokenizer
    if tok_dir is None and os.path.exists(os.path.join(output, "train_args.json")):
        with open(os.path.join(output, "train_args.json")) as f:
            a = json.load(f)
        tok_dir = a.get("tokenizer") or (a.get("model") if os.path.isdir(a.get("model") or "") else None)
    export(model_from(graphdef, abstract_state, params), out, tok_dir)
    return step
