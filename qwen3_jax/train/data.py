"""Training data: jsonl records -> token examples -> grain pipelines (shuffle, pack, batch) per data shard.

Record forms, one JSON object per line:
    {"text": "..."}                         loss on every token (an <|endoftext|> is appended when the
                                            tokenizer has it)
    {"messages": [{"role", "content"}...]}  rendered by the tokenizer's chat template; loss only on the
                                            assistant turns' tokens: the template's `{% generation %}` blocks
                                            when it has them (transformers' assistant mask), else the ChatML
                                            spans `<|im_start|>assistant\\n ... <|im_end|>` (<|im_end|> included)
    {"input_ids": [...], "labels": [...]?}  pre-tokenized; labels -100 = no loss (default: labels = input_ids);
                                            needs no tokenizer files
Labels follow transformers' convention (the token itself); each example is shifted inside itself into
`targets` (targets[t] = labels[t + 1], the last one -100), then examples are packed into rows of seq_len by
grain's FirstFitPackIterDataset: segment ids keep documents apart, positions restart per document.
An example longer than seq_len is cut into consecutive pieces of seq_len tokens after the shift, so every
target is kept (overflow "split", as transformers' run_clm chunks long texts; each piece is a document of its
own), or cut at seq_len (overflow "truncate", as TRL's SFTTrainer); `Corpus.long` counts them.
Malformed lines are reported as `file:line: reason` and skipped.

Data shards (what makes a run on N hosts equal to a run on one): the global batch's rows are split into K
equal blocks, one per distinct row range of the batch sharding on the mesh (K depends on the mesh and the
batch size, never on the number of processes). Record r (counting non-blank lines over the files in order)
belongs to data shard r % K, which feeds block r % K through its own pipeline (shuffled with seed + shard,
packed into rows of that block). A host reads and tokenizes only the records of the shards its devices
hold (`load_corpus(..., shards=)`), and `HostBatches` concatenates its shards' batches into its rows.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import grain
import grain.experimental as gex
import numpy as np

IGNORE = -100
_ASSISTANT = re.compile(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", re.S)
_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


class DataError(ValueError):
    pass


@dataclass
class Corpus:
    examples: list = field(default_factory=list)   # [{"inputs": int32 [n], "targets": int32 [n]}]
    shards: dict = field(default_factory=dict)     # data shard -> its examples (the wanted shards only)
    skipped: list = field(default_factory=list)    # ["file:line: reason"]
    long: int = 0                                  # records longer than seq_len (split or truncated)


def chat_example(tokenizer, messages) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels) of a conversation: labels are -100 outside the assistant turns (see the module
    docstring: generation blocks, else ChatML spans)."""
    template = tokenizer.get_chat_template()
    if isinstance(template, str) and _GENERATION_BLOCK.search(template):
        out = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
        ids = np.asarray(out["input_ids"], np.int32)
        return ids, np.where(np.asarray(out["assistant_masks"], bool), ids, IGNORE).astype(np.int32)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    enc = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    spans = [m.span(1) for m in _ASSISTANT.finditer(text)]
    ids = np.asarray(enc.ids, np.int32)
    starts = np.asarray([s for s, _ in enc.offsets], np.int64)
    keep = np.zeros(len(ids), bool)
    for s, e in spans:
        keep |= (starts >= s) & (starts < e)
    return ids, np.where(keep, ids, IGNORE).astype(np.int32)


def _ints(x, name):
    if not isinstance(x, list) or not x or not all(isinstance(v, int) and not isinstance(v, bool) for v in x):
        raise DataError(f"'{name}' must be a non-empty list of integers")
    return np.asarray(x, np.int64)


def parse_record(rec, tokenizer_fn, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One decoded JSON value -> (input_ids, labels); raises DataError with the reason."""
    if not isinstance(rec, dict):
        raise DataError(f"expected a JSON object, got {type(rec).__name__}")
    forms = [k for k in ("text", "messages", "input_ids") if k in rec]
    if len(forms) != 1:
        raise DataError("a record needs exactly one of 'text', 'messages', 'input_ids'" +
                        (f" (has {forms})" if forms else f" (keys: {sorted(rec)})"))
    form = forms[0]
    if form == "input_ids":
        ids = _ints(rec["input_ids"], "input_ids")
        if (ids < 0).any() or (ids >= vocab_size).any():
            raise DataError(f"'input_ids' must be in [0, {vocab_size})")
        labels = _ints(rec["labels"], "labels") if rec.get("labels") is not None else ids.copy()
        if len(labels) != len(ids):
            raise DataError(f"'labels' has {len(labels)} entries, 'input_ids' {len(ids)}")
        if ((labels < 0) & (labels != IGNORE)).any() or (labels >= vocab_size).any():
            raise DataError(f"'labels' must be token ids < {vocab_size} or {IGNORE}")
    else:
        tok = tokenizer_fn()
        if form == "text":
            if not isinstance(rec["text"], str) or not rec["text"]:
                raise DataError("'text' must be a non-empty string")
            ids = tok.encode(rec["text"], add_special_tokens=False)
            eot = tok.convert_tokens_to_ids("<|endoftext|>")
            ids = np.asarray(ids + ([eot] if isinstance(eot, int) else []), np.int64)
            labels = ids.copy()
        else:
            msgs = rec["messages"]
            if not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) for m in msgs):
                raise DataError("'messages' must be a non-empty list of objects with a 'role'")
            try:
                ids, labels = chat_example(tok, msgs)
            except Exception as e:  # noqa: BLE001  (template errors name the problem)
                raise DataError(f"chat template failed: {e}") from None
            if (labels == IGNORE).all():
                raise DataError("no assistant tokens to train on")
    if (ids < 0).any() or (ids >= vocab_size).any():
        raise DataError(f"token ids must be in [0, {vocab_size})")
    if len(ids) < 2 or (labels[1:] == IGNORE).all():
        raise DataError("no tokens to predict")
    return ids.astype(np.int32), labels.astype(np.int32)


OVERFLOW = ("split", "truncate")


def to_examples(ids, labels, seq_len: int, overflow: str = "split") -> list[dict]:
    """Shift labels inside the example (targets[t] = labels[t+1]), then pieces of at most seq_len tokens: all of
    it ("split"; a piece with no target left is dropped) or the first seq_len ("truncate")."""
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow {overflow!r}: choose from {OVERFLOW}")
    targets = np.concatenate([labels[1:], [IGNORE]]).astype(np.int32)
    end = len(ids) if overflow == "split" else min(len(ids), seq_len)
    pieces = [{"inputs": ids[i:i + seq_len], "targets": targets[i:i + seq_len]} for i in range(0, end, seq_len)]
    return [p for p in pieces if (p["targets"] != IGNORE).any()]


def load_corpus(paths, seq_len: int, vocab_size: int, tokenizer_fn, strict: bool = False, log=print,
                overflow: str = "split", shards: tuple = ((0,), 1)) -> Corpus:
    """Read jsonl files in order; malformed lines are reported (`file:line: reason`) and skipped, or raise.
    Records longer than seq_len are split or truncated (`overflow`, see the module docstring).
    `shards=(wanted, K)`: only the records of the wanted data shards (record r is in shard r % K) are parsed
    and tokenized; the counts (skipped, long) are of those records."""
    wanted, count = set(shards[0]), int(shards[1])
    corpus = Corpus(shards={k: [] for k in sorted(wanted)})
    record = -1
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record += 1
                if record % count not in wanted:
                    continue
                try:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"invalid JSON: {e.msg} (column {e.colno})") from None
                    ids, labels = parse_record(rec, tokenizer_fn, vocab_size)
                except DataError as e:
                    msg = f"{path}:{lineno}: {e}"
                    if strict:
                        raise DataError(msg) from None
                    log(f"skipped {msg}")
                    corpus.skipped.append(msg)
                    continue
                corpus.long += len(ids) > seq_len
                pieces = to_examples(ids, labels, seq_len, overflow)
                corpus.examples.extend(pieces)
                corpus.shards[record % count].extend(pieces)
    if corpus.long:
        log(f"{corpus.long} records longer than seq_len {seq_len} were "
            f"{'split into pieces' if overflow == 'split' else 'truncated'} (overflow={overflow})")
    return corpus


def dataset(examples, seq_len: int, host_batch: int, seed: int, *, repeat: bool = True,
            shard: tuple[int, int] = (0, 1)) -> grain.IterDataset:
    """grain pipeline: deterministic shuffle (reshuffled every epoch), this host's shard, first-fit packing
    into rows of seq_len, batches of `host_batch` rows. Iterators of it are checkpointable (get_state)."""
    if not examples:
        raise DataError("no usable training records")
    index, count = shard
    ds = grain.MapDataset.source(examples)[index::count].shuffle(seed=seed)
    if repeat:
        ds = ds.repeat(None)
    length = {"inputs": seq_len, "targets": seq_len}
    packed = gex.FirstFitPackIterDataset(ds.to_iter_dataset(), length_struct=length, num_packing_bins=host_batch,
                                         shuffle_bins=False)
    return packed.batch(host_batch, drop_remainder=repeat).map(to_batch)


def to_batch(packed: dict) -> dict:
    """Packed grain rows -> the step's inputs; padding (segment 0) gets target -100."""
    seg = packed["inputs_segment_ids"].astype(np.int32)
    return {
        "inputs": packed["inputs"].astype(np.int32),
        "targets": np.where(seg > 0, packed["targets"], IGNORE).astype(np.int32),
        "segment_ids": seg,
        "positions": packed["inputs_positions"].astype(np.int32),
    }


def batches_per_epoch(examples, seq_len: int, host_batch: int, seed: int, shard=(0, 1)) -> int:
    return sum(1 for _ in dataset(examples, seq_len, host_batch, seed, repeat=False, shard=shard))


def padding_batch(rows: int, seq_len: int) -> dict:
    """Rows that count for nothing: segment 0 (padding), no targets."""
    z = np.zeros((rows, seq_len), np.int32)
    return {"inputs": z, "targets": np.full((rows, seq_len), IGNORE, np.int32), "segment_ids": z, "positions": z}


class HostBatches:
    """This host's rows of each global batch: one `dataset` pipeline per data shard it holds (seed + shard),
    their batches concatenated in shard order. A shard without examples, and (repeat=False) a shard that has
    run out, gives padding rows, so every host keeps stepping with the others; `exhausted` says that every
    local shard has run out. Checkpointable: get_state() / set_state() of {"shards": {k: grain state}}."""

    def __init__(self, shards: dict, seq_len: int, rows: int, seed: int, *, repeat: bool = True):
        self.rows, self.seq_len, self.keys = rows, seq_len, sorted(shards)
        self._it = {k: iter(dataset(shards[k], seq_len, rows, seed + k, repeat=repeat)) for k in self.keys if shards[k]}
        self._live = set(self._it)
        self.exhausted = not self._live

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        parts = []
        for k in self.keys:
            b = next(self._it[k], None) if k in self._live else None
            if b is None:
                self._live.discard(k)
                parts.append(padding_batch(self.rows, self.seq_len))
                continue
            n = b["inputs"].shape[0]
            if n < self.rows:  # the last batch of a pass (repeat=False): padded with empty rows
                b = {key: np.concatenate([v, padding_batch(self.rows - n, self.seq_len)[key]]) for key, v in b.items()}
            parts.append(b)
        self.exhausted = not self._live
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

    def get_state(self) -> dict:
        return {"shards": {str(k): it.get_state() for k, it in self._it.items()}}

    def set_state(self, state: dict):
        if "shards" not in state and list(self._it) == [0]:  # a checkpoint of one pipeline (before data shards)
            state = {"shards": {"0": state}}
        saved = state.get("shards", {})
        missing = [k for k in self._it if str(k) not in saved]
        if missing:
            raise DataError(f"the checkpoint has no data-iterator state for data shard(s) {missing} (it was written "
                            f"with another mesh or --batch-size; it has shards {sorted(saved, key=int)})")
        for k, it in self._it.items():
            it.set_state(saved[str(k)])
