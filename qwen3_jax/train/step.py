"""The optimizer and the one jitted train step (forward, losses, gradients, accumulation, update).

Global-batch load-balancing loss under gradient accumulation (see losses.py for the definition):
with `lbl_scope="global"` and grad_accum > 1 the step first runs a forward-only router pre-pass over every
micro-batch (a `lax.scan`, no backward, logits never used so XLA drops the unembedding) to get the global
expert slot counts (f, not differentiated). Each micro-batch then contributes
    N_E * sum_i f_i * (its sum of router probs of expert i) / N_global      (mean over layers)
whose sum over micro-batches is exactly the global-batch LBL, and so are its gradients. The price is one
extra forward pass per step (about +1/3 compute) only when accumulating. Without accumulation the micro-batch
is the global batch (jit's arrays are global, every data-parallel shard included), so f comes from the same
forward. `lbl_scope="micro"` is the per-micro-batch LBL averaged over micro-batches (HF / MaxText).
The LM loss (masked mean over the global batch's target tokens) and the z-loss (mean over its real tokens)
likewise divide by global counts, so accumulation is exact for every term.

LoRA (StepConfig.lora): the trained parameters are the adapters (qwen3_jax.lora) and the model's weights come in
as a separate, frozen argument (`base`: not differentiated, not donated, not in the optimizer state). The adapters'
dropout draws from fold_in(key(seed), step, micro-batch), so a resumed run draws the same masks, and the router
pre-pass sees the same dropout as the micro-batch it counts for.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qwen3_jax.params import model_from, split_model  # noqa: F401  (the step's model split, re-exported)

from .losses import cross_entropy_sum, lbl_from_stats, lbl_stats, routed_top_k, router_z_loss_sum

# --freeze groups: parameter path patterns (re.fullmatch over "a/b/c")
FREEZE_GROUPS = {
    "router": r"layers/moe/router",
    "experts": r"layers/moe/(gate|up|down)_proj",
    "attention": r"layers/attn/([qkvo]_proj|[qk]_norm)",
    "mlp": r"layers/mlp/.*",
    "norms": r"(.*/)?[^/]*norm",
    "embed": r"embed_tokens",
    "lm_head": r"lm_head",
}
SCHEDULES = ("cosine", "linear", "constant")


def _path(kp) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in kp)


def frozen_mask(params, freeze=()):
    """Tree of bools: True for parameters in a frozen group."""
    unknown = set(freeze) - set(FREEZE_GROUPS)
    if unknown:
        raise ValueError(f"--freeze {sorted(unknown)}: choose from {', '.join(FREEZE_GROUPS)}")
    pats = [FREEZE_GROUPS[g] for g in freeze]
    return jax.tree_util.tree_map_with_path(lambda kp, _: any(re.fullmatch(p, _path(kp)) for p in pats), params)


def decay_mask(params):
    """Weight decay on every matrix except norm scales."""
    return jax.tree_util.tree_map_with_path(lambda kp, _: "norm" not in _path(kp).rsplit("/", 1)[-1], params)


def make_schedule(name: str, lr: float, warmup: int, steps: int):
    if name not in SCHEDULES:
        raise ValueError(f"--schedule {name!r}: choose from {SCHEDULES}")
    warmup = min(warmup, max(steps - 1, 0))
    decay = max(steps - warmup, 1)
    after = {"cosine": optax.cosine_decay_schedule(lr, decay),
             "linear": optax.linear_schedule(lr, 0.0, decay),
             "constant": optax.constant_schedule(lr)}[name]
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(lr / warmup, lr, warmup - 1), after], [warmup])


def make_optimizer(params, *, schedule, weight_decay: float, clip: float, freeze=(), b1=0.9, b2=0.95, eps=1e-8):
    """clip_by_global_norm -> AdamW (no decay on norms) on the trainable parameters; frozen ones get 0."""
    train = optax.chain(optax.clip_by_global_norm(clip) if clip and clip > 0 else optax.identity(),
                        optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
    labels = jax.tree.map(lambda f: "frozen" if f else "train", frozen_mask(params, freeze))
    return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, labels)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    grad_accum: int = 1
    lbl_coef: float = 0.001
    lbl_scope: str = "global"
    z_loss_coef: float = 0.0
    freeze: tuple = ()
    ce_chunk: int = 512
    lora: object = None      # a qwen3_jax.lora.LoRAConfig: train its adapters on the frozen weights
    seed: int = 0            # the LoRA dropout's keys


def _micro(batch, a: int):
    """[B, T] -> [A, B/A, T]: micro-batch m takes rows m, m+A, ... so each keeps the batch sharding."""
    def split(x):
        b = x.shape[0]
        if b % a:
            raise ValueError(f"global batch {b} is not divisible by grad_accum {a}")
        return jnp.swapaxes(x.reshape(b // a, a, *x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def make_grad_fn(graphdef, abstract_state, scfg: StepConfig):
    """grads(params, batch, base=None, step_no=None) -> (gradients, aux): the loss terms of the global batch and
    their gradients, accumulated over scfg.grad_accum micro-batches (lax.scan). Frozen parameters get zero gradients.

    params: pure dict of the model's nnx.Param arrays (with scfg.lora: the adapters, and `base` the model's
    frozen params); batch: dict of global [B, T] int32 arrays (inputs, targets (-100 = no loss), segment_ids
    (0 = padding), positions); step_no: the step (the LoRA dropout's key).
    """
    from qwen3_jax.model import LoRA

    cfg = model_from(graphdef, abstract_state, None).config
    top_k = routed_top_k(model_from(graphdef, abstract_state, None))   # the routing the model runs
    lcfg = scfg.lora

    def forward(params, mb, base, key):
        if lcfg is None:
            model = model_from(graphdef, abstract_state, params)
            lora = None
        else:
            model = model_from(graphdef, abstract_state, base)
            lora = LoRA(params, lcfg.scale, lcfg.dropout, key)
        return model, model(mb["inputs"], positions=mb["positions"], segment_ids=mb["segment_ids"], return_hidden=True,
                            lora=lora)

    def micro_loss(params, mb, counts_global, n_tgt, n_tok, base, key):
        model, out = forward(params, mb, base, key)
        w = (mb["targets"] >= 0).astype(jnp.float32)
        lm = cross_entropy_sum(model.unembed, out.hidden_states, mb["targets"], w, scfg.ce_chunk) / n_tgt
        lbl = z = jnp.float32(0)
        counts = jnp.zeros((1, 1), jnp.float32)
        dropped = jnp.int32(0)
        if cfg.is_moe:
            tok = mb["segment_ids"] > 0
            counts, prob_sums, n_micro = lbl_stats(out.router_logits, top_k, tok)
            if scfg.lbl_scope == "global":
                lbl = lbl_from_stats(counts if counts_global is None else counts_global, prob_sums, n_tok, top_k)
            else:
                lbl = lbl_from_stats(counts, prob_sums, n_micro, top_k) / scfg.grad_accum
            z = router_z_loss_sum(out.router_logits, tok) / n_tok
            if out.dropped_tokens is not None:
                dropped = jnp.sum(out.dropped_tokens).astype(jnp.int32)
        total = lm + scfg.lbl_coef * lbl + scfg.z_loss_coef * z
        return total, {"lm_loss": lm, "lbl": lbl, "z_loss": z, "counts": counts, "dropped_tokens": dropped}

    grad_fn = jax.grad(micro_loss, has_aux=True)

    def grads(params, batch, base=None, step_no=None):
        if (lcfg is None) != (base is None):
            raise ValueError("LoRA steps take the frozen params as `base`; full fine-tuning takes none")
        frozen = frozen_mask(params, scfg.freeze)
        a = scfg.grad_accum
        n_tgt = jnp.maximum(jnp.sum(batch["targets"] >= 0), 1).astype(jnp.float32)
        n_tok = jnp.maximum(jnp.sum(batch["segment_ids"] > 0), 1).astype(jnp.float32)
        mbs = _micro(batch, a)
        live = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
        keys = None                                                # micro-batch m's dropout key
        if lcfg is not None and lcfg.dropout > 0:
            step_key = jax.random.fold_in(jax.random.key(scfg.seed), jnp.int32(0) if step_no is None else step_no)
            keys = jax.vmap(lambda m: jax.random.fold_in(step_key, m))(jnp.arange(a))

        counts_global = None
        if cfg.is_moe and scfg.lbl_scope == "global" and a > 1:   # router pre-pass: global f, no backward
            def count(acc, xs):
                mb, key = xs
                _, out = forward(jax.lax.stop_gradient(params), mb, base, key)
                return acc + lbl_stats(out.router_logits, top_k, mb["segment_ids"] > 0)[0], None
            zeros = jnp.zeros((len(cfg.moe_layers), cfg.num_experts), jnp.float32)
            counts_global, _ = jax.lax.scan(count, zeros, (mbs, keys))

        first = jax.tree.map(lambda x: x[0], mbs)
        key0 = None if keys is None else keys[0]
        if a == 1:
            g, aux = grad_fn(live, first, None, n_tgt, n_tok, base, key0)
        else:
            def accumulate(carry, xs):
                g_acc, aux_acc = carry
                mb, key = xs
                g, aux = grad_fn(live, mb, counts_global, n_tgt, n_tok, base, key)
                return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, aux_acc, aux)), None

            zero_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            aux0 = jax.eval_shape(lambda: grad_fn(live, first, counts_global, n_tgt, n_tok, base, key0)[1])
            aux0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux0)
            (g, aux), _ = jax.lax.scan(accumulate, (zero_g, aux0), (mbs, keys))
        g = jax.tree.map(lambda g, p, f: jnp.zeros(p.shape, p.dtype) if f else g.astype(p.dtype), g, params, frozen)
        if counts_global is not None:
            aux["counts"] = counts_global
        aux["loss"] = aux["lm_loss"] + scfg.lbl_coef * aux["lbl"] + scfg.z_loss_coef * aux["z_loss"]
        aux["tokens"], aux["target_tokens"] = n_tok, n_tgt
        return g, aux

    return grads


def make_train_step(graphdef, abstract_state, tx, schedule, scfg: StepConfig, shardings=None):
    """Returns step(params, opt_state, batch, step_no, base=None) -> (params, opt_state, metrics), one jit.
    `shardings`: the (params, opt_state) shardings the outputs keep. With scfg.lora, params are the adapters and
    `base` the frozen model params (read, never donated nor returned)."""
    grads_fn = make_grad_fn(graphdef, abstract_state, scfg)

    def step(params, opt_state, batch, step_no, base=None):
        grads, aux = grads_fn(params, batch, base, step_no)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {**aux, "grad_norm": optax.tree.norm(grads), "lr": schedule(step_no)}

    out_shardings = None if shardings is None else (shardings[0], shardings[1], None)
    return jax.jit(step, donate_argnums=(0, 1), out_shardings=out_shardings)


def make_eval_step(graphdef, abstract_state, ce_chunk: int = 512, lora=None):
    """eval(params, batch, base=None) -> (sum of target nll, number of target tokens). lora: a LoRAConfig (params
    are then its adapters on the frozen `base`; no dropout)."""
    from qwen3_jax.model import LoRA

    def run(params, batch, base=None):
        model = model_from(graphdef, abstract_state, params if lora is None else base)
        out = model(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"], return_hidden=True,
                    lora=None if lora is None else LoRA(params, lora.scale))
        w = (batch["targets"] >= 0).astype(jnp.float32)
        return cross_entropy_sum(model.unembed, out.hidden_states, batch["targets"], w, ce_chunk), jnp.sum(w)
    return jax.jit(run)


def flops_per_token(cfg, seq_len: int, active_params: int, adapter_params: int | None = None) -> float:
    """Training FLOPs per token: 6 x active matmul parameters (embedding lookup excluded) + causal attention
    6 x L x H x hd x T (half of the full 12 L H hd T). LoRA (adapter_params: the adapters' parameter count): the
    frozen weights 4 x (forward and input gradient, no weight gradient) and the adapters 6 x."""
    matmul = active_params - cfg.vocab_size * cfg.hidden_size * (0 if cfg.tie_word_embeddings else 1)
    weights = 6.0 * matmul if adapter_params is None else 4.0 * matmul + 6.0 * adapter_params
    return weights + 6.0 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len


def host_metrics(m) -> dict:
    """Device metrics -> JSON-able floats / lists."""
    from .losses import expert_load

    out = {k: float(np.asarray(m[k])) for k in ("loss", "lm_loss", "lbl", "z_loss", "grad_norm", "lr")}
    out["dropped_tokens"] = int(np.asarray(m["dropped_tokens"]))
    counts = np.asarray(m["counts"])
    if counts.size > 1:
        load = {k: np.asarray(v).tolist() for k, v in expert_load(counts).items()}
        out["expert_load"] = {"max": load["max"], "min": load["min"], "cv": load["cv"]}
    return out


def opt_state_shardings(abstract_opt_state, params, mesh):
    """Shardings of an optimizer state: each moment on its parameter's sharding (matched by path suffix and shape),
    scalars (step counts) replicated. `params`: arrays or ShapeDtypeStructs that carry their sharding."""
    from jax.sharding import NamedSharding, PartitionSpec

    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    by_path = {tuple(str(k.key) for k in kp): x for kp, x in flat}

    def pick(kp, leaf):
        keys = tuple(str(k.key) for k in kp if isinstance(k, jax.tree_util.DictKey))
        for i in range(len(keys)):
            p = by_path.get(keys[i:])
            if p is not None and p.shape == leaf.shape:
                return p.sharding
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def lower_train_step(cfg, mesh, *, batch_size: int, seq_len: int, dtype="bfloat16", param_dtype=None,
                     remat: str = "full", scan_layers: bool = True, lr: float = 1e-5, steps: int = 1000,
                     warmup: int = 0, schedule: str = "cosine", weight_decay: float = 0.0, clip: float = 1.0,
                     grad_accum: int = 1, lbl_coef: float | None = None, lbl_scope: str = "global",
                     z_loss_coef: float = 0.0, freeze=(), ce_chunk: int = 512, ep_buffer_factor="default",
                     capacity_factor: float | None = None, gmm: str = "auto", lora_rank: int | None = None,
                     lora_alpha: float | None = None, lora_dropout: float = 0.0, lora_targets=None):
    """The train step qwen3-jax-train runs (chunked cross-entropy, global-batch LBL, AdamW with clipping,
    remat, accumulation), lowered for `mesh` (e.g. abstract TPU chips, see qwen3_jax.aot) with abstract sharded
    parameters, optimizer state and batch: nothing is allocated. Returns a jax.stages.Lowered (`.compile()` it).
    scan_layers=False unrolls the layers; gmm overrides the platform's grouped matmul (qwen3_jax.kernels).
    param_dtype: the master weights (default float32), or with lora_rank the frozen base (default bfloat16) beside
    fp32 adapters that alone have gradients and AdamW moments (plain XLA matmuls: the same on every platform)."""
    from qwen3_jax.sharding.rules import sharded_abstract_model
    from qwen3_jax.runtime import Runtime
    from qwen3_jax.sharding import activation_sharding

    if param_dtype is None:
        param_dtype = "bfloat16" if lora_rank else "float32"
    rt_kw = {} if ep_buffer_factor == "default" else {"ep_buffer_factor": ep_buffer_factor}
    runtime = Runtime(mesh=mesh, remat=remat, scan_layers=scan_layers, capacity_factor=capacity_factor, gmm=gmm,
                      **rt_kw)
    graphdef, abstract_state, params = sharded_abstract_model(cfg, runtime, dtype=dtype, param_dtype=param_dtype)
    lcfg, base = None, None
    if lora_rank:
        from qwen3_jax.lora import DEFAULT_TARGETS, LoRAConfig, adapter_shapes, adapter_shardings

        if freeze:
            raise ValueError("freeze: with LoRA the whole model is frozen")
        lcfg = LoRAConfig(rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout,
                          targets=lora_targets or DEFAULT_TARGETS)
        sh = adapter_shardings(cfg, lcfg, mesh)
        base, params = params, {t: {ab: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sh[t][ab])
                                    for ab, shape in s.items()} for t, s in adapter_shapes(cfg, lcfg).items()}
    sched = make_schedule(schedule, lr, warmup, steps)
    tx = make_optimizer(params, schedule=sched, weight_decay=weight_decay, clip=clip, freeze=tuple(freeze))
    opt_abstract = jax.eval_shape(tx.init, params)
    opt_sh = opt_state_shardings(opt_abstract, params, mesh)
    opt_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), opt_abstract, opt_sh)
    scfg = StepConfig(grad_accum=grad_accum, lbl_coef=cfg.router_aux_loss_coef if lbl_coef is None else lbl_coef,
                      lbl_scope=lbl_scope, z_loss_coef=z_loss_coef, freeze=tuple(freeze), ce_chunk=ce_chunk,
                      lora=lcfg)
    shardings = (jax.tree.map(lambda x: x.sharding, params), opt_sh)
    step = make_train_step(graphdef, abstract_state, tx, sched, scfg, shardings)
    bt = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32,
                              sharding=activation_sharding("bt", (batch_size, seq_len), mesh))
    batch = {k: bt for k in ("inputs", "targets", "segment_ids", "positions")}
    return step.lower(params, opt_state, batch, jax.ShapeDtypeStruct((), jnp.int32), base)
