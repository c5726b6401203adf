"""Server benchmark: qwen3-jax-serve over HTTP vs the same engine called directly, in one run on this machine (the
small Qwen3-MoE of bench/decode.py: 4 layers, hidden 256, 32 experts top-4, vocab 4096, fp32, no tokenizer).

    python bench/serve.py                          # 1, 8 and 32 concurrent clients
    python bench/serve.py --clients 8 --rounds 5

Each of C clients sends its requests one after another (32-token prompts of token ids, 64 new tokens, greedy, no
stop token), so C requests are in flight at any time:

- server: `qwen3-jax-serve --max-batch 32 --stream-interval 8 --warmup-len 32` in a child process, the clients are httpx streams
  of POST /v1/completions ("stream": true) from this process;
- direct: the engine's continuous batching in this process (`serving.EngineService`: the Scheduler thread with the
  same rows and stream interval), the clients are asyncio tasks reading its events; no HTTP, JSON or SSE.

Per level: throughput (new tokens/s over all clients, the median of the rounds), p50 / p99 time to first token
(submit -> the first token in the client, pooled over the rounds), and server / direct as ratios. The two sides
run interleaved round by round (the machine's speed drifts minute to minute), each after an unmeasured warm-up
round at that level, and their tokens are checked equal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from flax import nnx

import qwen3_jax
from qwen3_jax import Qwen3Config, Qwen3ForCausalLM
from qwen3_jax.hostmem import tune_malloc
from qwen3_jax.infer import SamplingParams
from qwen3_jax.infer.serving import EngineService, GenParams

from decode import SMALL  # bench/decode.py (this script's folder is on sys.path)

PROMPT, NEW, MAX_BATCH, INTERVAL, MAX_LEN = 32, 64, 32, 8, 256


def workload(clients: int, per_client: int, vocab: int, seed: int):
    rng = np.random.default_rng(seed)
    return [[rng.integers(0, vocab, PROMPT).tolist() for _ in range(per_client)] for _ in range(clients)]


# ---------------------------------------------------------------------------------------------------- the two sides
async def run_server(url: str, work) -> tuple[float, list[float], list[list[int]]]:
    import httpx

    ttft, tokens = [], []

    async def client(c, prompts):
        for p in prompts:
            body = {"prompt": p, "max_tokens": NEW, "temperature": 0, "stream": True}
            t0, first, ids = time.perf_counter(), None, []
            async with c.stream("POST", "/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    new = json.loads(line[6:])["choices"][0]["token_ids"]
                    if new and first is None:
                        first = time.perf_counter() - t0
                    ids += new
            ttft.append(first)
            tokens.append(ids)

    limits = httpx.Limits(max_connections=len(work) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c, prompts) for prompts in work))
        return time.perf_counter() - t0, ttft, tokens


async def run_direct(service: EngineService, work) -> tuple[float, list[float], list[list[int]]]:
    params = GenParams(SamplingParams(temperature=0.0), NEW, [], [])
    ttft, tokens = [], []

    async def client(prompts):
        for p in prompts:
            t0, first, ids = time.perf_counter(), None, []
            async for _, ev in service.submit([p], params).events():
                if ev.token_ids and first is None:
                    first = time.perf_counter() - t0
                ids += ev.token_ids
            ttft.append(first)
            tokens.append(ids)

    t0 = time.perf_counter()
    await asyncio.gather(*(client(prompts) for prompts in work))
    return time.perf_counter() - t0, ttft, tokens


# ---------------------------------------------------------------------------------------------------- the server
def start_server(model_dir: str) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).parent / "qwen3-jax-serve"
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([str(exe), "--model", model_dir, "--port", str(port), "--max-batch", str(MAX_BATCH),
                             "--max-len", str(MAX_LEN), "--stream-interval", str(INTERVAL), "--max-queue", "1024",
                             "--warmup-len", str(PROMPT), "--log-level", "warning"], stdout=subprocess.DEVNULL,
                            stderr=log)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            log.seek(0)
            sys.exit(f"qwen3-jax-serve exited ({proc.returncode}):\n{log.read()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.5)


def pct(xs, q):
    return float(np.percentile(np.asarray(xs), q)) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrency levels")
    ap.add_argument("--requests", type=int, default=32, help="requests per level and round (at least 2 per client)")
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds per side and level")
    args = ap.parse_args()
    print(f"host malloc tuned for XLA:CPU (qwen3_jax.hostmem): {tune_malloc()}")
    import jax

    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores); {PROMPT}-token prompts, "
          f"{NEW} new tokens, greedy, {MAX_BATCH} rows, stream interval {INTERVAL}")
    with tempfile.TemporaryDirectory() as d:
        qwen3_jax.save_pretrained(Qwen3ForCausalLM(Qwen3Config.from_dict(SMALL), rngs=nnx.Rngs(0)), d)
        proc, url = start_server(d)
        service = EngineService(qwen3_jax.from_pretrained(d), None, max_batch=MAX_BATCH, max_len=MAX_LEN,
                                max_queue=1024, chunk=INTERVAL)
        service.start()
        try:
            service.warmup(PROMPT)
            print(f"{'clients':>7} {'side':>7} {'tok/s':>9} {'ttft p50':>9} {'ttft p99':>9}   (ms)")
            for c in args.clients:
                per = max(2, -(-args.requests // c))
                sides = {"server": lambda w: run_server(url, w), "direct": lambda w: run_direct(service, w)}
                stats = {k: {"tps": [], "ttft": []} for k in sides}
                for r in range(args.rounds + 1):  # round 0: warm-up, not measured
                    work = workload(c, per, SMALL["vocab_size"], seed=1000 * c + r)
                    got = {}
                    for side, fn in sides.items():
                        wall, ttft, got[side] = asyncio.run(fn(work))
                        if r:
                            stats[side]["tps"].append(sum(map(len, got[side])) / wall)
                            stats[side]["ttft"] += ttft
                    assert sorted(got["server"]) == sorted(got["direct"]), "server and direct tokens differ"
                for side, s in stats.items():
                    print(f"{c:7d} {side:>7} {np.median(s['tps']):9.0f} {pct(s['ttft'], 50):9.1f} "
                          f"{pct(s['ttft'], 99):9.1f}")
                sv, dr = stats["server"], stats["direct"]
                print(f"{c:7d} {'ratio':>7} {np.median(sv['tps']) / np.median(dr['tps']):9.2f} "
                      f"{pct(sv['ttft'], 50) / pct(dr['ttft'], 50):9.2f} {pct(sv['ttft'], 99) / pct(dr['ttft'], 99):9.2f}"
                      "   (server / direct)")
        finally:
            service.stop()
            proc.terminate()
            proc.wait(60)


if __name__ == "__main__":
    main()
