"""The sampling filters (qwen3_jax/infer/sampling.py) against a plain numpy implementation of temperature, min-p, top-k and
top-p (vLLM's order) on fixed logits: the filtered distributions equal (same kept tokens, same probabilities),
each candidate set (lax.top_k) taken where it is exact, and sampled frequencies that follow the reference."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3_jax.infer.sampling import CANDIDATES, filter_logits, sample, top_candidates

V = 3000  # more than the largest candidate set: every path runs
SMALL, WIDE = CANDIDATES


def reference_probs(logits_v, temperature, top_k, top_p, min_p):
    """The filtered distribution [V] (float64), written from the definitions: scale by the temperature; sort
    descending (ties: lower id first); min-p keeps p >= min_p * p_max; top-k (k > 0) keeps the k most likely;
    top-p (< 1) keeps the smallest prefix of the distribution those two leave whose mass reaches top_p; the most
    likely token always stays; renormalise."""
    s = np.asarray(logits_v, np.float64) / (temperature if temperature > 0 else 1.0)
    order = np.argsort(-s, kind="stable")
    with np.errstate(invalid="ignore"):
        p = np.exp(s[order] - s[order][0])
    p = np.nan_to_num(p) / np.nan_to_num(p).sum()
    keep = p >= min_p * p[0]
    if top_k > 0:
        keep &= np.arange(len(p)) < top_k
    p2 = np.where(keep, p, 0.0)
    p2 /= p2.sum()
    if top_p < 1:                                                # 1: off
        keep &= (np.cumsum(p2) - p2) < top_p
    keep[0] = True
    out = np.zeros(len(p))
    out[order[keep]] = p[keep]
    return out / out.sum()


def reference_kept(logits_v, temperature, top_k, top_p, min_p):
    """The tokens the reference keeps, among those whose unfiltered probability a float32 can hold (> 1e-30), and
    that mask: the filters' cuts, whatever underflows."""
    s = np.asarray(logits_v, np.float64) / (temperature if temperature > 0 else 1.0)
    relevant = _softmax64(s) > 1e-30
    return (reference_probs(logits_v, temperature, top_k, top_p, min_p) > 0) & relevant, relevant


def _logit_sets():
    rng = np.random.default_rng(0)
    flat = rng.normal(size=V)                                    # top-p needs far more than the candidates
    peaked = -0.35 * rng.permutation(V) + rng.normal(size=V)     # a few tokens hold almost all the mass
    ties = rng.integers(-4, 4, V).astype(np.float64)             # many equal logits at every boundary
    ties[rng.choice(V, 5, replace=False)] = 6.0
    masked = peaked.copy()
    masked[rng.random(V) < 0.5] = -np.inf                        # a constrained step: disallowed tokens
    heavy = rng.standard_t(2, size=V) * 3                        # heavy-tailed
    medium = np.where(np.arange(V) < 400, 4.0, -2.0) + rng.normal(size=V) * 0.5  # top-p ends past SMALL, within WIDE
    return dict(flat=flat, peaked=peaked, ties=ties, masked=masked, heavy=heavy, medium=medium)


GRID = list(itertools.product((0.6, 1.0, 1.7), (0, -1, 1, 20, SMALL, SMALL + 1, 300, WIDE, WIDE + 1, V),
                              (1.0, 0.95, 0.5, 0.05), (0.0, 0.05, 0.3)))


def _softmax64(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))  # -inf -> 0
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("name", list(_logit_sets()))
def test_filtered_distribution_equals_reference(name):
    """Every (temperature, top_k, top_p, min_p) of the grid as one row of a single batch (per-row parameters, the
    candidate and the full-vocabulary rows side by side): the same kept tokens, the same probabilities."""
    logits = _logit_sets()[name]
    t, k, p, m = (np.asarray(c) for c in zip(*GRID))
    out = np.asarray(jax.jit(filter_logits)(jnp.asarray(np.broadcast_to(logits, (len(GRID), V)), jnp.float32),
                                 jnp.asarray(t, jnp.float32), jnp.asarray(k, jnp.int32), jnp.asarray(p, jnp.float32),
                                 jnp.asarray(m, jnp.float32)))
    ours = _softmax64(np.where(np.isfinite(out), out, -np.inf))
    for row, params in enumerate(GRID):
        ref = reference_probs(logits.astype(np.float32), *params)
        kept, relevant = reference_kept(logits.astype(np.float32), *params)
        np.testing.assert_array_equal(np.isfinite(out[row]) & relevant, kept, err_msg=f"{name} {params}: kept")
        np.testing.assert_allclose(ours[row], ref, rtol=2e-5, atol=1e-9, err_msg=f"{name} {params}")


def test_candidate_path_is_taken_where_it_is_exact():
    """Qwen3's settings (top-k 20), any top-k up to the candidates and min-p ending inside them stay in the small
    set; top-p alone ending inside the candidates in the wide set (which knows the vocabulary's mass); top-p alone
    over a flat distribution, or a top-k past the candidates without min-p, need the vocabulary."""
    sets = _logit_sets()
    cases = [  # (logits, top_k, top_p, min_p, exact in SMALL, exact in WIDE)
        ("flat", 20, 0.95, 0.0, True, True), ("flat", SMALL, 1.0, 0.0, True, True), ("flat", 1, 1.0, 0.0, True, True),
        ("peaked", -1, 1.0, 0.05, True, True), ("peaked", 300, 1.0, 0.05, True, True),
        ("peaked", 0, 0.95, 0.0, False, True), ("medium", 0, 0.95, 0.0, False, True),
        ("flat", 300, 1.0, 0.0, False, True), ("flat", 0, 0.95, 0.0, False, False),
        ("flat", WIDE + 1, 1.0, 0.0, False, False), ("flat", 0, 1.0, 0.0, False, False),
        ("peaked", 0, 1.0, 0.0, False, False),
    ]
    logits = jnp.asarray(np.stack([sets[c[0]] for c in cases]), jnp.float32)
    col = lambda i, dt: jnp.asarray([c[i] for c in cases], dt)  # noqa: E731
    t = jnp.full((len(cases),), 0.6, jnp.float32)
    for count, i in ((SMALL, 4), (WIDE, 5)):
        *_, exact = top_candidates(logits, t, col(1, jnp.int32), col(2, jnp.float32), col(3, jnp.float32), count,
                                   vocab_mass=count == WIDE)
        assert np.asarray(exact).tolist() == [c[i] for c in cases], count


def test_top_p_ending_at_the_last_candidate():
    """WIDE equal tokens hold a fraction f of the mass (temperature 0.6): top-p alone just below f ends at the last
    candidate (exact in the wide set), just above f needs the next token (the full sort); both equal the
    reference."""
    logits = np.zeros(V)
    logits[np.random.default_rng(1).choice(V, WIDE, replace=False)] = 3.0
    w = np.exp(logits / 0.6)
    f = np.sort(w)[::-1][:WIDE].sum() / w.sum()
    other = 1 / w.sum()                                          # one of the other tokens
    top_p = np.array([f - other / 4, f + other / 4], np.float32)
    x = jnp.asarray(np.stack([logits, logits]), jnp.float32)
    t, k, m = jnp.full((2,), 0.6, jnp.float32), jnp.zeros((2,), jnp.int32), jnp.zeros((2,), jnp.float32)
    *_, exact = top_candidates(x, t, k, jnp.asarray(top_p), m, WIDE, vocab_mass=True)
    assert np.asarray(exact).tolist() == [True, False]
    out = np.asarray(filter_logits(x, t, k, jnp.asarray(top_p), m))
    for row in range(2):
        ref = reference_probs(logits.astype(np.float32), 0.6, 0, float(top_p[row]), 0.0)
        assert np.isfinite(out[row]).sum() == (ref > 0).sum() == WIDE + row
        np.testing.assert_allclose(_softmax64(out[row]), ref, rtol=2e-5, atol=1e-9)


SAMPLED = [  # (logits, temperature, top_k, top_p, min_p): each path of `sample`
    ("peaked", 0.6, 20, 0.95, 0.0),      # Qwen3's settings: the small candidate set
    ("heavy", 0.8, 0, 1.0, 0.3),         # min-p alone, ending inside the small set
    ("medium", 0.6, 0, 0.95, 0.0),       # top-p alone, mass inside the wide set
    ("ties", 1.0, 150, 0.9, 0.0),        # a top-k past the small set: the wide set
    ("flat", 1.0, 0, 0.5, 0.0),          # top-p alone over a flat distribution: full sort
    ("heavy", 0.8, 0, 1.0, 0.1),         # min-p alone: its threshold over the vocabulary
]


@pytest.mark.parametrize("case", SAMPLED, ids=[f"{c[0]}-k{c[2]}-p{c[3]}-m{c[4]}" for c in SAMPLED])
def test_sampling_frequencies_follow_reference(case):
    """10000 draws (fixed keys: the same draws every run) land only on the reference's kept tokens, with
    frequencies within 6 standard errors (+ 1e-3) of its probabilities."""
    name, t, k, p, m = case
    logits = _logit_sets()[name].astype(np.float32)
    ref = reference_probs(logits, t, k, p, m)
    n = 10000
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(n))
    full = lambda v, dt: jnp.full((n,), v, dt)  # noqa: E731
    toks = jax.jit(sample)(jnp.asarray(np.broadcast_to(logits, (n, V))), keys, full(t, jnp.float32),
                           full(k, jnp.int32), full(p, jnp.float32), full(m, jnp.float32))
    freq = np.bincount(np.asarray(toks), minlength=V) / n
    assert set(np.nonzero(freq)[0]) <= set(np.nonzero(ref)[0])
    np.testing.assert_array_less(np.abs(freq - ref), 6 * np.sqrt(ref * (1 - ref) / n) + 1e-3)


def test_a_row_samples_the_same_whatever_shares_its_batch():
    """A seeded row draws the same token alone, beside rows that need the full sort, and beside greedy rows."""
    sets = _logit_sets()
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(7), i))(jnp.arange(3))

    jitted = jax.jit(sample)

    def run(rows, keys):
        logits = jnp.asarray(np.stack([sets[r[0]] for r in rows]), jnp.float32)
        col = lambda i, dt: jnp.asarray([r[i] for r in rows], dt)  # noqa: E731
        return np.asarray(jitted(logits, keys[:len(rows)], col(1, jnp.float32), col(2, jnp.int32),
                                 col(3, jnp.float32), col(4, jnp.float32)))

    qwen, medium = ("flat", 0.6, 20, 0.95, 0.0), ("medium", 0.6, 0, 0.95, 0.0)
    for step in range(8):
        keys = jax.vmap(jax.random.fold_in, (0, None))(keys, step)
        alone = run([qwen], keys)[0], run([medium], keys[1:])[0]   # each with the key of its row below
        mixed = run([qwen, medium, ("flat", 1.0, 0, 0.5, 0.0)], keys)
        assert (mixed[0], mixed[1]) == alone
        assert run([qwen, ("peaked", 0.0, 0, 1.0, 0.0)], keys)[0] == alone[0]
