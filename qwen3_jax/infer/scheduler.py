"""Continuous batching for a server: one thread owns the Engine and its cache rows.

Callers `submit` `Sequence`s (a bounded waiting queue: `QueueFull` past `max_queue`) and `cancel` them from
any thread. The thread loops: drop cancelled sequences (their rows end at once: `Engine.release`), prefill
waiting sequences into free rows, run one decode call for all running rows, and hand each sequence its new
tokens through its `emit` callback (called on the scheduler thread: keep it short, e.g.
`loop.call_soon_threadsafe`). Requests arriving while others decode join at the next call, so concurrent
requests share decode steps.

A decode call runs up to `chunk` steps (the stream interval), whatever rows it holds. The engine calls a host
function after every step of a call (`Engine.decode_ex(next_mask=...)`) when some row needs one: a constrained row
(`constrain.Constraint`), whose next token mask depends on the token just sampled, and a row just filled, whose
first token is emitted from there after one step (unless it asks for logprobs, or the token may end the row: those
come with the chunk). So neither cuts a call short for the other rows; such a call ends early only when requests
arrive while a row is free for them. Per-token logprobs are computed only while some row asks for them.

If the thread dies (an error outside a decode step), `alive` turns false, what was queued or running ends with
"error", and `submit` raises `EngineDead`: the server answers 503 (and /health too).
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .engine import Engine
from .generate import MAX_STOP_IDS, Request, row_params, stop_token_ids, think_token_ids
from .sampling import SamplingParams

log = logging.getLogger("qwen3_jax.serve")

REASONS = {1: "stop", 2: "length"}


class QueueFull(Exception):
    pass


class EngineDead(RuntimeError):
    """The scheduler thread is not running (stopped, or died: `Scheduler.death` says why)."""


@dataclass
class Event:
    """New tokens of one sequence. finish_reason: None (more to come), "stop", "length", "abort" (cancelled or
    the scheduler stopped) or "error" (`error` says why)."""
    token_ids: list[int]
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None  # per token: (logprob, [(id, logprob)])
    finish_reason: str | None = None
    error: str | None = None
    time: float = field(default_factory=time.perf_counter)


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    emit: Callable[[Event], None]
    sampling: SamplingParams = SamplingParams(temperature=0.0)
    max_new_tokens: int = 16
    stop_token_ids: list[int] = field(default_factory=list)
    thinking_budget: int | None = None
    constraint: object | None = None      # constrain.Constraint
    logprobs: bool = False
    submitted: float = 0.0                # perf_counter at submit
    done: bool = False
    cancelled: bool = False


class Scheduler:
    def __init__(self, model, *, tokenizer=None, max_batch: int = 8, max_len: int = 2048, max_queue: int = 256,
                 chunk: int = 8, cache_dtype=None, grammars=None):
        self.think_ids, forced = think_token_ids(tokenizer)
        self.engine = Engine(model, think_ids=self.think_ids, forced_ids=forced, chunk=chunk)
        self.max_batch, self.max_len, self.max_queue, self.chunk = max_batch, max_len, max_queue, chunk
        self.cache_dtype = cache_dtype
        self.grammars = grammars
        self.vocab_size = model.config.vocab_size
        self.slots = None
        self._cv = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._cancelled: list[Sequence] = []
        self._rows: list[Sequence | None] = [None] * max_batch
        self._fresh: set[int] = set()    # rows prefilled whose first token is not out yet
        self._stop = False
        self._thread: threading.Thread | None = None
        self.death: str | None = None    # why the thread died, if it did
        self.steps = 0                   # decode calls made (for tests and metrics)

    # -- any thread ------------------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return sum(r is not None for r in self._rows)

    @property
    def started(self) -> bool:
        """`start` was called (the thread may have ended since)."""
        return self._thread is not None

    @property
    def alive(self) -> bool:
        """The thread runs (False before `start`, after `stop`, or once it died)."""
        return self._thread is not None and self._thread.is_alive() and self.death is None

    def submit(self, seqs: list[Sequence]):
        """Queue sequences (all or none): QueueFull when the waiting queue would exceed max_queue."""
        for s in seqs:
            if not 1 <= len(s.prompt_ids) < self.max_len:
                raise ValueError(f"prompt of {len(s.prompt_ids)} tokens; the cache holds {self.max_len}")
            stop_token_ids(s.stop_token_ids, vocab_size=self.vocab_size)  # ValueError: too many, or not token ids
        with self._cv:
            if self._stop:
                raise EngineDead("the scheduler is stopped")
            if self.death is not None or (self._thread is not None and not self._thread.is_alive()):
                raise EngineDead("the engine thread has died")
            if len(self._waiting) + len(seqs) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (--max-queue {self.max_queue})")
            now = time.perf_counter()
            for s in seqs:
                s.submitted = now
                self._waiting.append(s)
            self._cv.notify()

    def cancel(self, seq: Sequence):
        """Stop a sequence: it emits an "abort" event (unless it already finished) and frees its row."""
        with self._cv:
            if not (seq.done or seq.cancelled):
                seq.cancelled = True
                self._cancelled.append(seq)
                self._cv.notify()

    def start(self):
        if self.slots is None:
            self.slots = self.engine.new_slots(self.max_batch, self.max_len, MAX_STOP_IDS, self.cache_dtype)
        self._thread = threading.Thread(target=self._run, name="qwen3-jax-scheduler", daemon=True)
        self._thread.start()

    def stop(self):
        """Abort what is left and end the thread."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()

    # -- scheduler thread ------------------------------------------------------------------------------------
    def _run(self):
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001  (whatever killed the thread: requests must not wait forever)
            self.death = f"{type(e).__name__}: {e}"
            log.critical("the scheduler thread died:\n%s", traceback.format_exc())
            with self._cv:
                left, self._waiting, self._cancelled = [*self._waiting, *self._cancelled], deque(), []
            left += [s for s in self._rows if s is not None]
            self._rows = [None] * self.max_batch
            for s in left:
                try:
                    self._finish(s, "error", "the engine stopped")
                except Exception:  # noqa: BLE001
                    log.error("could not end a sequence:\n%s", traceback.format_exc())

    def _loop(self):
        while True:
            with self._cv:
                while not (self._stop or self._waiting or self._cancelled or any(self._rows)):
                    self._cv.wait()
                if self._stop:
                    self._abort_all("abort", None)
                    return
                cancelled, self._cancelled = self._cancelled, []
                for s in cancelled:
                    if s in self._waiting:
                        self._waiting.remove(s)
                admit = []
                free = [r for r in range(self.max_batch) if self._rows[r] is None]
                while free and self._waiting:
                    admit.append((free.pop(0), self._waiting.popleft()))
                more_waiting = bool(self._waiting)
            try:
                self._step(cancelled, admit, more_waiting)
            except Exception as e:  # noqa: BLE001  (a device error must not kill the server)
                log.error("decode step failed:\n%s", traceback.format_exc())
                for r, s in admit:
                    if self._rows[r] is not s:
                        self._finish(s, "error", f"{type(e).__name__}: {e}")
                self._abort_all("error", f"{type(e).__name__}: {e}", waiting=False)
                self.slots = self.engine.new_slots(self.max_batch, self.max_len, MAX_STOP_IDS, self.cache_dtype)

    def _allow_all(self) -> np.ndarray:
        """A token bitmask [B, ceil(V / 32)] that allows every token (xgrammar's layout)."""
        return np.full((self.max_batch, (self.vocab_size + 31) // 32), -1, np.int32)

    def _finish(self, s: Sequence, reason: str, error: str | None = None, tokens=(), logprobs=None):
        if not s.done:
            s.done = True
            s.emit(Event(list(tokens), logprobs, reason, error))

    def _abort_all(self, reason, error, waiting=True):
        for r, s in enumerate(self._rows):
            if s is not None:
                self._finish(s, reason, error)
                self._rows[r] = None
        self._fresh.clear()
        if waiting:
            with self._cv:
                left, self._waiting = list(self._waiting), deque()
            for s in left:
                self._finish(s, reason, error)

    def _step(self, cancelled, admit, more_waiting):
        gone = []
        for s in cancelled:
            for r, x in enumerate(self._rows):
                if x is s:
                    self._rows[r] = None
                    self._fresh.discard(r)
                    gone.append(r)
            self._finish(s, "abort")
        if gone:
            self.slots = self.engine.release(self.slots, gone)
        if admit:
            row = row_params([Request(s.prompt_ids, s.sampling, s.max_new_tokens, s.stop_token_ids, s.thinking_budget)
                              for _, s in admit], MAX_STOP_IDS, self.think_ids)
            self.slots = self.engine.prefill(self.slots, [s.prompt_ids for _, s in admit], [r for r, _ in admit], row)
            for r, s in admit:
                self._rows[r] = s
                self._fresh.add(r)
        live = [(r, s) for r, s in enumerate(self._rows) if s is not None]
        if not live:
            return
        constrained = [(r, s) for r, s in live if s.constraint is not None]
        # new rows' first tokens go out from inside the call (after its first step), so no call is cut short for them
        # (rows that want logprobs get theirs with the chunk: the hook sees tokens only)
        fresh = [(r, s) for r, s in live if r in self._fresh and not s.logprobs]
        early: set[int] = set()
        free = self.max_batch - len(live)
        mask = next_mask = None
        if constrained or fresh:
            mask = self._allow_all()
            for r, s in constrained:
                s.constraint.fill(mask, r)

            def next_mask(tokens_b, active_b):  # called by the engine after each step
                for r, s in fresh:
                    t = int(tokens_b[r])
                    if r not in early and active_b[r] and s.max_new_tokens > 1 and t not in s.stop_token_ids:
                        early.add(r)  # (a token that may end the row waits: a stop token is no text)
                        s.emit(Event([t]))
                nxt = self._allow_all()
                for r, s in constrained:  # the matchers take the tokens and give the next masks
                    if active_b[r]:
                        s.constraint.accept(int(tokens_b[r]))
                    s.constraint.fill(nxt, r)
                # requests that arrived during the call end it when a row is free for them (they come in bursts
                # right after rows were filled: no new request waits a whole chunk for its prefill then)
                return nxt, bool(free and self._waiting)
        out = self.engine.decode_ex(self.slots, self.chunk, stop_on_finish=more_waiting, mask_bw=mask,
                                    next_mask=next_mask, logprobs=any(s.logprobs for _, s in live))
        self.slots = out.slots
        self.steps += 1
        self._fresh.clear()
        for r, s in live:
            cols = np.nonzero(out.tokens_bn[r] >= 0)[0]
            if r in early:
                cols = cols[1:]  # already emitted
            toks = [int(t) for t in out.tokens_bn[r, cols]]
            lps = None
            if s.logprobs and out.logprob_bn is not None:
                lps = [(float(out.logprob_bn[r, c]),
                        list(zip(out.top_ids_bnk[r, c].tolist(), out.top_logprobs_bnk[r, c].tolist()))) for c in cols]
            reason = REASONS.get(int(out.reason_b[r]))
            if reason is not None:
                self._rows[r] = None
                self._finish(s, reason, tokens=toks, logprobs=lps)
            elif toks and not s.done:
                s.emit(Event(toks, lps))
