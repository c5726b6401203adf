"""Sampling parameters and the pure sampling math (per-row parameters, vLLM semantics).

Order, as vLLM applies it: penalties on the raw logits (repetition over prompt + output tokens; presence and
frequency over output tokens), temperature, min-p, top-k, top-p (over the distribution left by min-p and
top-k), then a categorical draw. temperature 0 = greedy (argmax of the penalised logits).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import jax
import jax.numpy as jnp

# Qwen3 model-card recommendations (used when there is no generation_config.json)
QWEN3_THINKING = dict(temperature=0.6, top_p=0.95, top_k=20, min_p=0.0)
QWEN3_NON_THINKING = dict(temperature=0.7, top_p=0.8, top_k=20, min_p=0.0)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0      # 0 = greedy
    top_k: int = 0                # 0 (or <0) = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @classmethod
    def from_generation_config(cls, path_or_dict=None, enable_thinking: bool = True, **overrides) -> "SamplingParams":
        """From generation_config.json (a checkpoint directory, the file, or its dict) when present, else Qwen3's
        recommendations (thinking: T 0.6 / top-p 0.95 / top-k 20; non-thinking: 0.7 / 0.8 / 20). `do_sample:
        false` means greedy. Keyword overrides (None values ignored) win."""
        gc = None
        if isinstance(path_or_dict, dict):
            gc = path_or_dict
        elif path_or_dict is not None:
            path = os.fspath(path_or_dict)
            if os.path.isdir(path):
                path = os.path.join(path, "generation_config.json")
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    gc = json.load(f)
        kw = dict(QWEN3_THINKING if enable_thinking else QWEN3_NON_THINKING)
        if gc:
            names = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty", "seed")
            kw.update({k: gc[k] for k in names if gc.get(k) is not None})
            if gc.get("do_sample") is False:
                kw["temperature"] = 0.0
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)

    def replace(self, **kw) -> "SamplingParams":
        return dataclasses.replace(self, **kw)


# ============================================================================ pure functions over rows
def apply_penalties(logits_bv, seen_bv, counts_bv, repetition_b, presence_b, frequency_b):
    """vLLM penalties. seen_bv: token occurs in the prompt or the output (repetition penalty: positive logits
    divided by it, negative multiplied); counts_bv: occurrences in the output (logits -= frequency * count +
    presence * (count > 0))."""
    rep = repetition_b[:, None]
    logits_bv = jnp.where(seen_bv, jnp.where(logits_bv > 0, logits_bv / rep, logits_bv * rep), logits_bv)
    counts = counts_bv.astype(logits_bv.dtype)
    return logits_bv - frequency_b[:, None] * counts - presence_b[:, None] * (counts > 0)


# Candidate sets: the filters run over a row's C largest logits (lax.top_k first, as MaxText, jax-llm-examples
# and vLLM's top-k path do) wherever that gives the exact distribution: top_k in (0, C], or min-p ending inside
# them, or (top-k off, the sets past the first) top-p's prefix ending inside them. A row takes the first set that
# holds its distribution (the next set is computed only when some row needs it); the rest take a full sort of the
# vocabulary (top-k and top-p both off: min-p's threshold alone). 64 covers Qwen3's top-k 20 and transformers'
# 50; 1024, top-p alone over most trained models' distributions.
CANDIDATES = (64, 1024)


def scale(logits_bv, temperature_b):
    """fp32 logits divided by the row's temperature (rows with temperature 0 unscaled)."""
    t = jnp.where(temperature_b > 0, temperature_b, 1.0)[:, None]
    return logits_bv.astype(jnp.float32) / t


def _kept_weights(sorted_bn, top_k_b, min_p_b):
    """(kept by min-p and top-k [B, N], their probabilities relative to the row's largest, exp(s - s_max), 0
    elsewhere) over a row's N largest scaled logits sorted descending."""
    rel = jnp.exp(sorted_bn - sorted_bn[:, :1])
    keep = rel >= min_p_b[:, None]
    keep &= (top_k_b[:, None] <= 0) | (jnp.arange(sorted_bn.shape[-1])[None] < top_k_b[:, None])
    return keep, jnp.where(keep, rel, 0.0)


def keep_prefix(sorted_bn, top_k_b, top_p_b, min_p_b, mass_b=None):
    """The kept tokens [B, N] among a row's N largest scaled logits sorted descending (N may be the vocabulary):
    min-p against the row's largest probability, top-k, then top-p over the distribution those two leave (the
    smallest prefix whose mass reaches top_p; 1 = off); the first is always kept. Probabilities are taken
    relative to the largest, so nothing is normalised over the N. mass_b: the relative probabilities summed over
    every token min-p and top-k keep, where those reach past the N (None: the N hold them all)."""
    keep, w = _kept_weights(sorted_bn, top_k_b, min_p_b)
    mass = jnp.sum(w, -1) if mass_b is None else mass_b
    in_top_p = (jnp.cumsum(w, -1) - w) < top_p_b[:, None] * mass[:, None]
    keep &= in_top_p | (top_p_b[:, None] >= 1.0)                 # off, not a sum rounded to 1
    return keep.at[:, 0].set(True)


# The functions below take the raw logits and the temperatures and scale inside each branch: a scaled [B, V] copy
# passed into the branches of a cond would be one more buffer of the vocabulary's size (the TPU decode program
# keeps such operands alive across the cond).
def top_candidates(logits_bv, temperature_b, top_k_b, top_p_b, min_p_b, count: int = CANDIDATES[0],
                   vocab_mass: bool = False):
    """(scaled logits [B, C], token ids [B, C], keep [B, C], exact [B]) of each row's C = min(count, V) largest
    scaled logits (ties: the lower id first, as a stable sort orders them). Where `exact`, the filtered distribution
    lies inside the candidates and `keep` is it; elsewhere the row needs more of the vocabulary. vocab_mass: also
    rows with top-k off whose top-p prefix ends inside the candidates (that needs the mass of the whole
    vocabulary: a second pass over the logits, which the common case, a top-k, does without)."""
    b, v = logits_bv.shape
    c = min(count, v)
    # the barriers keep XLA from folding slices of the result into the op, which turns it into a full sort
    # (XLA:CPU then sorts the vocabulary: 66 ms a row instead of 0.3). One barrier per output: a barrier over the
    # pair lets XLA feed the op's tuple to it directly, which XLA:CPU's TopkDecomposer cannot read when the op
    # is partitioned over devices (a check failure that aborts the process).
    vals, ids = jax.lax.top_k(scale(logits_bv, temperature_b), c)
    vals, ids = jax.lax.optimization_barrier(vals), jax.lax.optimization_barrier(ids)
    inside = ((top_k_b > 0) & (top_k_b <= c)) | (c == v)
    min_p_ends = jnp.exp(vals[:, -1] - vals[:, 0]) < min_p_b          # so do all tokens past the candidates
    if not vocab_mass or c == v:
        return vals, ids, keep_prefix(vals, top_k_b, top_p_b, min_p_b), inside | min_p_ends
    top_k_off = (top_k_b <= 0) | (top_k_b >= v)
    open_b = top_k_off & ~min_p_ends & (top_p_b < 1.0)                # top-p decides, over the whole vocabulary
    rel = jnp.exp(scale(logits_bv, temperature_b) - vals[:, :1])
    mass_v = jnp.sum(jnp.where(rel >= min_p_b[:, None], rel, 0.0), -1)
    cand_mass = jnp.sum(_kept_weights(vals, top_k_b, min_p_b)[1], -1)  # in open rows: every candidate
    keep = keep_prefix(vals, top_k_b, top_p_b, min_p_b, jnp.where(open_b, mass_v, cand_mass))
    exact = inside | min_p_ends | (open_b & (cand_mass >= top_p_b * mass_v))  # top-p's prefix ends inside
    return vals, ids, keep, exact


def filter_vocab(logits_bv, temperature_b, top_k_b, top_p_b, min_p_b):
    """The filters over the whole vocabulary: scaled logits [B, V] with -inf where dropped. A stable descending sort,
    or, where every row has top-k and top-p off, min-p's threshold alone."""
    b, v = logits_bv.shape

    def by_min_p(_):
        scaled = scale(logits_bv, temperature_b)
        rel = jnp.exp(scaled - jnp.max(scaled, -1, keepdims=True))
        return jnp.where(rel >= min_p_b[:, None], scaled, -jnp.inf)

    def by_sort(_):
        scaled = scale(logits_bv, temperature_b)
        order_bv = jnp.argsort(-scaled, axis=-1, stable=True)         # descending, ties: lower id first
        sorted_bv = jnp.take_along_axis(scaled, order_bv, axis=-1)
        masked = jnp.where(keep_prefix(sorted_bv, top_k_b, top_p_b, min_p_b), sorted_bv, -jnp.inf)
        return jnp.full_like(scaled, -jnp.inf).at[jnp.arange(b)[:, None], order_bv].set(masked)

    unsorted = jnp.all(((top_k_b <= 0) | (top_k_b >= v)) & (top_p_b >= 1.0))
    return jax.lax.cond(unsorted, by_min_p, by_sort, None)


def filter_logits(logits_bv, temperature_b, top_k_b, top_p_b, min_p_b):
    """Temperature, then min-p, top-k, top-p masks (-inf). Returns filtered logits [B, V] in vocab order.
    Rows with temperature 0 are left unscaled (the caller takes their argmax)."""
    b, v = logits_bv.shape
    filters = (temperature_b, top_k_b, top_p_b, min_p_b)

    def tier(counts):
        if not counts:
            return filter_vocab(logits_bv, *filters)
        wide = counts[0] != CANDIDATES[0]
        vals, ids, keep, exact = top_candidates(logits_bv, *filters, counts[0], vocab_mass=wide)
        out = jnp.full((b, v), -jnp.inf, jnp.float32).at[jnp.arange(b)[:, None], ids].set(
            jnp.where(keep, vals, -jnp.inf))
        if counts[0] >= v:
            return out
        rest = jax.lax.cond(jnp.all(exact), lambda _: out, lambda _: tier(counts[1:]), None)
        return jnp.where(exact[:, None], out, rest)

    return tier(CANDIDATES)


def argmax(logits_bv):
    """jnp.argmax over the last axis (first index of the maximum, a NaN counting as the maximum) [B] int32, as
    two plain reductions: XLA:CPU runs argmax's (value, index) reduce element by element (18 us per decode step
    for a 4096 vocabulary, 1.8 us this way)."""
    v = logits_bv.shape[-1]
    m = jnp.max(logits_bv, axis=-1, keepdims=True)                     # NaN if the row has one
    hit = (logits_bv == m) | (jnp.isnan(logits_bv) & jnp.isnan(m))
    return jnp.min(jnp.where(hit, jnp.arange(v, dtype=jnp.int32), v), axis=-1)


def sample(logits_bv, keys_b2, temperature_b, top_k_b, top_p_b, min_p_b):
    """Next token per row [B] int32: argmax where temperature == 0, else a draw from the filtered distribution
    with the row's own key (uint32 [B, 2]). All-greedy batches take the argmax alone. A row draws among the first
    of its candidate sets (`top_candidates`, CANDIDATES) that holds its distribution, else over the whole
    vocabulary: the choice and the draw depend on the row alone, so a seeded row samples the same tokens whatever
    shares its batch."""

    def draw(_):
        sampled = temperature_b > 0
        top_k = jnp.where(sampled, top_k_b, 1)        # a greedy row keeps its first candidate: the argmax
        filters = (temperature_b, top_k, top_p_b, min_p_b)
        v = logits_bv.shape[-1]

        def tier(counts):
            if not counts:
                filt = filter_vocab(logits_bv, *filters)
                return jax.vmap(jax.random.categorical)(keys_b2, filt).astype(jnp.int32)
            wide = counts[0] != CANDIDATES[0]
            vals, ids, keep, exact = top_candidates(logits_bv, *filters, counts[0], vocab_mass=wide)
            j = jax.vmap(jax.random.categorical)(keys_b2, jnp.where(keep, vals, -jnp.inf))
            drawn = jnp.take_along_axis(ids, j[:, None], 1)[:, 0].astype(jnp.int32)
            if counts[0] >= v:
                return drawn
            rest = jax.lax.cond(jnp.all(exact), lambda _: drawn, lambda _: tier(counts[1:]), None)
            return jnp.where(exact, drawn, rest)

        return tier(CANDIDATES)

    return jax.lax.cond(jnp.all(temperature_b <= 0), lambda _: argmax(logits_bv), draw, None).astype(jnp.int32)


def seed_key(seed: int):
    """uint32 [2] threefry key of `seed`, as jax.random.PRNGKey(seed)."""
    seed = int(seed) & (2**64 - 1)
    return [(seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF]
