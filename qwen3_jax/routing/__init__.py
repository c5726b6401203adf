"""Routing research toolkit: capture router statistics, report them, intervene on the routing, prune experts.

    from qwen3_jax.routing import Intervention, capture, evaluate, report, reap_saliency, prune_experts
    stats = capture(model, [ids, ...], domains=[...])                  # RoutingStats (streaming counts)
    stats.save("out/"); report("out/")                                 # stats.json, CSV, PNGs, index.html
    report("out/", definitions="olmoe")                                # + OLMoE's definitions (routing.olmoe)
    model.runtime = model.runtime.replace(routing=Intervention(top_k=4, disable={5: [3, 17]}))
    evaluate(model, [ids, ...])                                        # loss / perplexity under it
    pruned = prune_experts(model, reap_saliency(model, [ids, ...]), keep=64)   # then save_pretrained

Command line: `qwen3-jax-routing capture|report|compare|eval|prune` (qwen3_jax.routing.cli).
"""

from .intervention import Intervention, route_topk
from .stats import RoutingStats, TraceWriter, batch_stats, capture, evaluate, vocab_specialization

__all__ = ["Intervention", "route_topk", "RoutingStats", "TraceWriter", "batch_stats", "capture", "evaluate",
           "vocab_specialization", "report", "compare", "reap_saliency", "prune_experts"]


def __getattr__(name):  # report (matplotlib) and pruning load on first use
    if name in ("report", "compare"):
        from . import reporting as _report

        return getattr(_report, name)
    if name in ("reap_saliency", "prune_experts"):
        from . import prune as _prune

        return getattr(_prune, name)
    raise AttributeError(name)
