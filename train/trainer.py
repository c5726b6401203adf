"""The training run: model + mesh, data, optimizer, orbax checkpoints (auto-resume), metrics, export.

`<output>/` holds: `model/config.json` (the model's config, for export), `checkpoints/<step>/` (orbax:
params, opt_state, data iterator state, meta with step / RNG / skipped records), `metrics.jsonl`.
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
                   make_train_step, model_from, split_model)

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
    kw = dict(remat=args.remat, capacity_factor=args.capacity_factor)
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
    """tx.init with each moment on its parameter's sharding (matched by path suffix), scalars replicated."""
    by_path = {tuple(str(k.key) for k in kp): x.sharding for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    shapes = {p: x.shape for p, x in zip(by_path, jax.tree.leaves(params))}

    def pick(kp, leaf):
        keys = tuple(str(k.key) for k in kp if isinstance(k, jax.tree_util.DictKey))
        for i in range(len(keys)):
            if keys[i:] in by_path and shapes[keys[i:]] == leaf.shape:
                return by_path[keys[i:]]
        return NamedSharding(mesh, P())

    out = jax.tree_util.tree_map_with_path(pick, jax.eval_shape(tx.init, params))
    return jax.jit(tx.init, out_shardings=out)(params)


def truncate_metrics(path, last_step):
    """Keep the metrics lines of steps <= last_step (a killed run may have logged steps past its checkpoint)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= last_step]
    with open(path, "w") as f:
        f.writelines(keep)


def global_batch(host_batch: dict, mesh) -> dict:
    """This host's rows -> global arrays sharded over the batch axes."""
    out = {}
    for k, v in host_batch.items():
        shape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
        out[k] = jax.make_array_from_process_local_data(activation_sharding("bt", shape, mesh), v, shape)
    return out


def evaluate(eval_fn, params, examples, args, mesh, host_batch):
    nll = n = 0.0
    for b in D.dataset(examples, args.seq_len, host_batch, args.seed, repeat=False,
                       shard=(jax.process_index(), jax.process_count())):
        rows = b["inputs"].shape[0]
        if rows < host_batch:  # pad the last batch with empty rows (segment 0, no targets)
            b = {k: np.concatenate([v, np.full((host_batch - rows,) + v.shape[1:], D.IGNORE if k == "targets" else 0,
                                               v.dtype)]) for k, v in b.items()}
        s, c = eval_fn(params, global_batch(b, mesh))
        nll, n = nll + float(s), n + float(c)
    return nll / max(n, 1.0)


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


def train(args, log=print) -> dict:
    """Run (or resume) a training job described by the parsed CLI `args`; returns a result summary."""
    os.makedirs(args.output, exist_ok=True)
    sizes = parse_mesh(args.mesh)
    n_mesh = math.prod(sizes.values())
    # a mesh smaller than the machine uses its first devices (e.g. --mesh data=1 on a multi-device host)
    mesh = make_mesh(**sizes, devices=jax.devices()[:n_mesh] if 0 < n_mesh < jax.device_count() else None)
    model = build_model(args, mesh)
    cfg = model.config
    os.makedirs(os.path.join(args.output, "model"), exist_ok=True)
    cfg.save_pretrained(os.path.join(args.output, "model"))

    n_proc = jax.process_count()
    if args.batch_size % n_proc:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by the {n_proc} processes")
    host_batch = args.batch_size // n_proc
    shard = (jax.process_index(), n_proc)
    tok = lazy_tokenizer(tokenizer_dir(args))
    corpus = D.load_corpus(args.data, args.seq_len, cfg.vocab_size, tok, strict=args.strict, log=log,
                           overflow=args.overflow)
    eval_corpus = D.load_corpus(args.eval_data, args.seq_len, cfg.vocab_size, tok, strict=args.strict, log=log,
                                overflow=args.overflow) if args.eval_data else None
    skipped = len(corpus.skipped)
    # --epochs: passes over the packed data, counted on the whole corpus so that every host gets the same count
    steps = args.steps or math.ceil(args.epochs * D.batches_per_epoch(corpus.examples, args.seq_len, args.batch_size,
                                                                       args.seed))
    if not steps or steps < 1:
        raise ValueError("give --steps or --epochs")

    graphdef, abstract_state, params = split_model(model)
    del model
    schedule = make_schedule(args.schedule, args.lr, args.warmup, steps)
    tx = make_optimizer(params, schedule=schedule, weight_decay=args.weight_decay, clip=args.clip,
                        freeze=tuple(args.freeze))
    opt_state = init_opt_state(tx, params, mesh)
    shardings = jax.tree.map(lambda x: x.sharding, (params, opt_state))
    lbl_coef = cfg.router_aux_loss_coef if args.lbl_coef is None else args.lbl_coef
    scfg = StepConfig(grad_accum=args.grad_accum, lbl_coef=lbl_coef, lbl_scope=args.lbl_scope,
                      z_loss_coef=args.z_loss_coef, freeze=tuple(args.freeze))
    train_step = make_train_step(graphdef, abstract_state, tx, schedule, scfg, shardings)
    rng = jax.random.key(args.seed)

    ds = D.dataset(corpus.examples, args.seq_len, host_batch, args.seed, shard=shard)
    it = iter(ds)
    mngr = checkpoint_manager(args.output, args.keep)
    metrics_path = os.path.join(args.output, "metrics.jsonl")
    start = 0
    latest = mngr.latest_step()
    opt_def = jax.tree.structure(opt_state)
    if latest is not None:
        restored = mngr.restore(latest, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_of(params)),
            opt_state=ocp.args.StandardRestore(abstract_of(jax.tree.leaves(opt_state))),
            data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        params = restored.params
        opt_state = jax.tree.unflatten(opt_def, restored.opt_state)
        it.set_state(restored.data)
        meta = restored.meta
        rng = jax.random.wrap_key_data(jnp.asarray(meta["rng"], jnp.uint32))
        start = int(meta["step"])
        truncate_metrics(metrics_path, start)
        log(f"resumed from {mngr.directory}/{latest} at step {start}")

    saved = start

    def save(step):
        nonlocal saved
        saved = step
        mngr.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(jax.tree.leaves(opt_state)),
            data=ocp.args.JsonSave(it.get_state()),
            meta=ocp.args.JsonSave({"step": step, "rng": np.asarray(jax.random.key_data(rng)).tolist(),
                                    "skipped_records": skipped})))

    eval_fn = make_eval_step(graphdef, abstract_state) if eval_corpus else None
    active = qwen3_jax.param_count(cfg)["active"]
    fpt = flops_per_token(cfg, args.seq_len, active)
    rows = []
    bar = tqdm(total=steps, initial=start, desc="train", dynamic_ncols=True, disable=not args.progress)
    with open(metrics_path, "a") as mf:
        for step in range(start, steps):
            t0 = time.perf_counter()
            batch = global_batch(next(it), mesh)
            rng, _ = jax.random.split(rng)  # the step's key (reserved for stochastic layers); saved for resume
            params, opt_state, m = train_step(params, opt_state, batch, jnp.int32(step))
            row = {"step": step + 1, **host_metrics(m)}
            dt = time.perf_counter() - t0
            n_tokens = args.batch_size * args.seq_len
            row["tokens_per_s"] = n_tokens / dt
            row["real_tokens"] = int(np.asarray(m["tokens"]))
            row["mfu"] = (fpt * n_tokens / dt / (args.peak_flops * jax.device_count())) if args.peak_flops else None
            row["skipped_records"] = skipped
            row["long_records"] = corpus.long
            row["step_time_s"] = dt
            if step + 1 == steps or (args.save_every and (step + 1) % args.save_every == 0):
                if eval_fn is not None:
                    row["eval_loss"] = evaluate(eval_fn, params, eval_corpus.examples, args, mesh, host_batch)
                save(step + 1)
            if jax.process_index() == 0:
                mf.write(json.dumps(row) + "\n")
                mf.flush()
            rows.append(row)
            bar.update(1)
            if args.stop_after_steps and len(rows) >= args.stop_after_steps and step + 1 < steps:
                if saved != step + 1:
                    save(step + 1)
                log(f"stopping after {len(rows)} steps this run (--stop-after-steps); rerun to resume")
                break
            bar.set_postfix(loss=f"{row['loss']:.4f}", lbl=f"{row['lbl']:.3f}", gn=f"{row['grad_norm']:.2f}")
    bar.close()
    mngr.wait_until_finished()
    mngr.close()
    if args.export_hf and (rows[-1]["step"] if rows else start) == steps:  # only a finished run is exported
        export(model_from(graphdef, abstract_state, params), args.export_hf, tokenizer_dir(args))
        log(f"exported Hugging Face checkpoint to {args.export_hf}")
    return {"rows": rows, "params": params, "steps": steps, "skipped": corpus.skipped}


def export(model, out, tok_dir=None):
    qwen3_jax.save_pretrained(model, out)
    copy_tokenizer(tok_dir, out)


def restore_params(checkpoint: str):
    """(config, params pure dict, step, run output dir) of an orbax step: `checkpoint` is a training --output
    directory (latest step) or one step's directory `<output>/checkpoints/<step>`."""
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
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
    meta = mngr.item_metadata(step)
    leaf = jax.tree.leaves(meta.params)[0] if meta is not None and meta.params is not None else None
    dtype = jnp.dtype(leaf.dtype) if leaf is not None else jnp.float32
    abstract = nnx.eval_shape(lambda: qwen3_jax.Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0), param_dtype=dtype))
    _, _, abstract_params = split_model(abstract)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), abstract_params)
    params = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))).params
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
