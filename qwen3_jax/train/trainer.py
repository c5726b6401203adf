"""The training run: model + mesh, data, optimizer, orbax checkpoints (auto-resume), metrics, export.

`<output>/` holds: `model/config.json` (the model's config, for export), `train_args.json`,
`checkpoints/<step>/` (orbax: params, opt_state, the data iterators' state per data shard, meta with the step
and the skipped records), `metrics.jsonl`, and with --routing-stats-every `routing/step_<step>/` (the held-out set's
routing capture, qwen3_jax.routing). On several processes (a pod slice), process 0 writes everything
but the checkpoints, which orbax writes from every process.

With --lora-rank the checkpoints hold the adapters and their optimizer state only (meta adds the LoRA config): the
frozen base is read again from --model on resume, and the export is a PEFT adapter (or with --merge-lora the base
with the adapters merged in).
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


def lora_config(args):
    """The run's qwen3_jax.lora.LoRAConfig, or None for full fine-tuning."""
    if not getattr(args, "lora_rank", None):
        return None
    from qwen3_jax.lora import DEFAULT_TARGETS, LoRAConfig

    return LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout or 0.0,
                      targets=args.lora_targets or DEFAULT_TARGETS)


def merged_model(graphdef, abstract_state, base, adapters, lcfg):
    """The model of `base` params with the adapters merged into new attention weights (base is left as it is)."""
    from qwen3_jax.lora import merge_params

    model = model_from(graphdef, abstract_state, base)
    merged = merge_params(base["layers"]["attn"], adapters, lcfg)
    for t, w in merged.items():
        getattr(model.layers.attn, t).set_value(w)
    return model


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
    """A readable per-step table (about 20 rows, and every step with an eval loss) of loss, eval loss, lbl and
    expert load."""
    if not rows:
        return "no steps run"
    evals = {i for i, r in enumerate(rows) if r.get("eval_loss") is not None}
    every = 1 if len(rows) <= 20 else math.ceil(len(rows) / 19)
    pick = [rows[i] for i in sorted({*range(0, len(rows), every), len(rows) - 1, *evals})]
    ev = bool(evals)
    lines = [f"{'step':>6} {'loss':>9} {'lm_loss':>9}" + (f" {'eval_loss':>9}" if ev else "")
             + f" {'lbl':>7} {'grad_norm':>9} {'lr':>9} {'tok/s':>9} {'load max/min (worst layer)':>27} {'cv':>6}"]
    for r in pick:
        load = r.get("expert_load")
        ld = ""
        cv = ""
        if load:
            i = int(np.argmax(load["cv"]))
            ld, cv = f"{load['max'][i]:.3f}/{load['min'][i]:.3f} (L{i})", f"{load['cv'][i]:.3f}"
        e = r.get("eval_loss")
        lines.append(f"{r['step']:>6} {r['loss']:>9.4f} {r['lm_loss']:>9.4f}"
                     + ((f" {e:>9.4f}" if e is not None else f" {'':>9}") if ev else "")
                     + f" {r['lbl']:>7.4f} {r['grad_norm']:>9.3f} {r['lr']:>9.2e} {r['tokens_per_s']:>9.0f} "
                     f"{ld:>27} {cv:>6}")
    return "\n".join(lines)


def routing_records(args, cfg, tok, log) -> list:
    """--routing-data (else --eval-data) as routing.stats.Record's; every process reads all of it (the capture
    runs the same batches on every process). Bad lines are named (by process 0) and skipped."""
    from qwen3_jax.routing.stats import read_records

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
    lcfg, base = lora_config(args), None
    if lcfg is not None:  # the model's params stay as they are; the trained params are the adapters
        from qwen3_jax.lora import init_adapters

        base, params = params, init_adapters(cfg, lcfg, args.seed, mesh)
    schedule = make_schedule(args.schedule, args.lr, args.warmup, steps)
    tx = make_optimizer(params, schedule=schedule, weight_decay=args.weight_decay, clip=args.clip,
                        freeze=tuple(args.freeze))
    opt_state = init_opt_state(tx, params, mesh)
    lbl_coef = cfg.router_aux_loss_coef if args.lbl_coef is None else args.lbl_coef
    scfg = StepConfig(grad_accum=args.grad_accum, lbl_coef=lbl_coef, lbl_scope=args.lbl_scope,
                      z_loss_coef=args.z_loss_coef, freeze=tuple(args.freeze), lora=lcfg, seed=args.seed)
    if args.batch_size % args.grad_accum:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by --grad-accum {args.grad_accum}")
    return dict(mesh=mesh, cfg=cfg, rows=rows, corpus=corpus, eval_corpus=eval_corpus, skipped=skipped, long=long,
                steps=steps, eval_steps=eval_steps, graphdef=graphdef, abstract_state=abstract_state, params=params,
                schedule=schedule, tx=tx, opt_state=opt_state, scfg=scfg, routing=routing, base=base)


def _run(args, log, *, mesh, cfg, rows, corpus, eval_corpus, skipped, long, steps, eval_steps, graphdef,
         abstract_state, params, schedule, tx, opt_state, scfg, routing, base=None) -> dict:
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
    lcfg = scfg.lora
    if latest is not None:
        try:
            meta = mngr.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except (ValueError, OSError, KeyError) as e:
            raise SetupError(f"{mngr.directory}/{latest}: cannot resume from this checkpoint: {e}") from e
        was = meta.get("lora")
        if was != (None if lcfg is None else lcfg.to_json()):
            def flags(d):
                return "full fine-tuning" if d is None else (
                    f"--lora-rank {d['rank']} --lora-alpha {d['alpha']:g} --lora-dropout {d['dropout']:g} "
                    f"--lora-targets {','.join(d['targets'])}")
            raise SetupError(f"{mngr.directory}/{latest}: this run was {flags(was)}, not "
                             f"{flags(None if lcfg is None else lcfg.to_json())}: resume it with its own flags "
                             "(or give a new --output)")
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
        meta = {"step": step, "skipped_records": skipped}
        if lcfg is not None:
            meta["lora"] = lcfg.to_json()
        mngr.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(jax.tree.leaves(opt_state)),
            data=ocp.args.JsonSave(state), meta=ocp.args.JsonSave(meta)))

    def routing_stats(step) -> str:
        """The held-out set's routing capture under the current params (every process runs it; process 0 writes)."""
        from qwen3_jax.routing import capture

        model = (model_from(graphdef, abstract_state, params) if lcfg is None else
                 merged_model(graphdef, abstract_state, base, params, lcfg))
        stats = capture(model, routing, batch_size=args.batch_size, max_len=args.seq_len)
        stats.model_name = f"{os.path.abspath(args.output)} step {step}"
        out_dir = os.path.join(args.output, "routing", f"step_{step}")
        if writer:
            stats.save(out_dir)
        return os.path.relpath(out_dir, args.output)

    eval_fn = make_eval_step(graphdef, abstract_state, lora=lcfg) if eval_corpus else None
    if eval_fn is not None and base is not None:
        eval_fn = (lambda fn: lambda p, batch: fn(p, batch, base))(eval_fn)
    active = qwen3_jax.param_count(cfg)["active"]
    fpt = flops_per_token(cfg, args.seq_len, active,
                          None if lcfg is None else sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)))
    out_rows = []
    bar = tqdm(total=steps, initial=start, desc="train", dynamic_ncols=True, disable=not (args.progress and writer))
    mf = open(metrics_path, "a") if writer else None
    try:
        for step in range(start, steps):
            t0 = time.perf_counter()
            batch = global_batch(next(it), mesh, args.batch_size)
            params, opt_state, m = train_step(params, opt_state, batch, jnp.int32(step), base)
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
        if lcfg is None:
            export(model_from(graphdef, abstract_state, params), args.export_hf, tokenizer_dir(args))
        elif getattr(args, "merge_lora", False):
            export(merged_model(graphdef, abstract_state, base, params, lcfg), args.export_hf, tokenizer_dir(args))
        else:
            export_adapter(params, lcfg, cfg, args.export_hf, _base_name(args.model), tokenizer_dir(args))
        if writer:
            what = "PEFT LoRA adapter" if lcfg is not None and not getattr(args, "merge_lora", False) else \
                "Hugging Face checkpoint"
            log(f"exported {what} to {args.export_hf}")
    return {"rows": out_rows, "params": params, "steps": steps, "skipped": corpus.skipped, "skipped_total": skipped}


def export(model, out, tok_dir=None):
    """Hugging Face safetensors + tokenizer files (every process calls it; process 0 writes)."""
    qwen3_jax.save_pretrained(model, out)
    if jax.process_index() == 0:
        copy_tokenizer(tok_dir, out)


def export_adapter(adapters, lcfg, cfg, out, base_model=None, tok_dir=None):
    """A PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) + tokenizer files (every process calls
    it; process 0 writes)."""
    from qwen3_jax.lora import save_adapter

    save_adapter(adapters, lcfg, cfg, out, base_model)
    if jax.process_index() == 0:
        copy_tokenizer(tok_dir, out)


def _base_name(model: str) -> str:
    """adapter_config.json's base_model_name_or_path: a checkpoint directory's absolute path, or the preset."""
    return os.path.abspath(model) if os.path.isdir(model) else model


def restore_params(checkpoint: str, mesh=None):
    """(config, params pure dict, step, run output dir) of an orbax step: `checkpoint` is a training --output
    directory (latest step) or one step's directory `<output>/checkpoints/<step>`. The params are restored
    straight into their shards on `mesh` (default: every device of every process on 'fsdp'), so no host
    holds the whole model. A LoRA run's params are its adapters (run_lora_config says so)."""
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
    mesh = mesh if mesh is not None else make_mesh(fsdp=-1)
    lcfg = _checkpoint_lora(mngr, step)
    if lcfg is not None:
        from qwen3_jax.lora import adapter_shapes, adapter_shardings

        sh = adapter_shardings(cfg, lcfg, mesh)
        target = {t: {ab: jax.ShapeDtypeStruct(shape, dtype, sharding=sh[t][ab]) for ab, shape in s.items()}
                  for t, s in adapter_shapes(cfg, lcfg).items()}
    else:
        abstract = nnx.eval_shape(lambda: qwen3_jax.Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0), param_dtype=dtype))
        _, _, abstract_params = split_model(abstract)
        from qwen3_jax.sharding import param_shardings

        shardings = param_shardings(cfg, mesh)
        target = jax.tree_util.tree_map_with_path(
            lambda kp, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings[tuple(str(k.key) for k in kp)]),
            abstract_params)
    try:
        params = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))).params
    finally:
        mngr.close()
    return cfg, params, step, output


def _checkpoint_lora(mngr, step):
    """The LoRAConfig a checkpoint's meta records, or None (full fine-tuning)."""
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    if not meta or not meta.get("lora"):
        return None
    from qwen3_jax.lora import LoRAConfig

    return LoRAConfig.from_json(meta["lora"])


def run_lora_config(checkpoint: str):
    """The LoRAConfig of a training run's latest step (or of one step's directory), None for full fine-tuning."""
    checkpoint = os.path.abspath(checkpoint)
    base = os.path.basename(checkpoint.rstrip("/"))
    ckpt_dir = os.path.dirname(checkpoint) if base.isdigit() else os.path.join(checkpoint, "checkpoints")
    mngr = ocp.CheckpointManager(ckpt_dir)
    try:
        step = int(base) if base.isdigit() else mngr.latest_step()
        return None if step is None else _checkpoint_lora(mngr, step)
    finally:
        mngr.close()


def export_checkpoint(checkpoint: str, out: str, tokenizer: str | None = None, merge_lora: bool = False,
                      base: str | None = None) -> int:
    """Write the params of an orbax step as a Hugging Face checkpoint (+ the run's tokenizer files). A LoRA run's
    step is written as a PEFT adapter, or with merge_lora merged into its base (`base`: a checkpoint directory;
    default the run's --model, in the run's --param-dtype)."""
    cfg, params, step, output = restore_params(checkpoint)
    args = {}
    if os.path.exists(os.path.join(output, "train_args.json")):
        with open(os.path.join(output, "train_args.json")) as f:
            args = json.load(f)
    tok_dir = tokenizer
    if tok_dir is None:
        tok_dir = args.get("tokenizer") or (args.get("model") if os.path.isdir(args.get("model") or "") else None)
    lcfg = run_lora_config(checkpoint)
    if lcfg is None:
        if merge_lora or base:
            raise ValueError(f"{checkpoint}: not a LoRA run (--merge-lora and --base are for --lora-rank runs)")
        dtype = jax.tree.leaves(params)[0].dtype
        model = nnx.eval_shape(lambda: qwen3_jax.Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0), param_dtype=dtype))
        graphdef, abstract_state, _ = split_model(model)
        export(model_from(graphdef, abstract_state, params), out, tok_dir)
        return step
    model_arg = base or args.get("model")
    if not merge_lora:
        if base:
            raise ValueError("--base is the checkpoint to merge into: it needs --merge-lora")
        export_adapter(params, lcfg, cfg, out, None if model_arg is None else _base_name(model_arg), tok_dir)
        return step
    if not model_arg:
        raise ValueError(f"{output}: no train_args.json naming the base model: give --base DIR")
    import argparse

    run = argparse.Namespace(model=model_arg, dtype=args.get("dtype", "float32"), seed=args.get("seed", 0),
                             param_dtype=args.get("param_dtype") or "bfloat16", remat="none", capacity_factor=None)
    if base and os.path.isdir(base):
        keys = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim")
        other = qwen3_jax.Qwen3Config.from_pretrained(base)
        if any(getattr(other, k) != getattr(cfg, k) for k in keys):
            raise ValueError(f"--base {base}: its attention shapes are not those of the run's model "
                             f"({output}/model/config.json)")
    merge_into = build_model(run, make_mesh(fsdp=-1))
    from qwen3_jax.lora import merge_into_model

    export(merge_into_model(merge_into, params, lcfg), out, tok_dir)
    return step
