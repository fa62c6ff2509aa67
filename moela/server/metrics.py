"""Prometheus metrics for `GET /metrics` (vLLM's names, with the `moela:` prefix).

    metrics = ServerMetrics(lambda: worker.snapshot)   # the engine thread's latest stats
    metrics.ttft.observe(0.12); metrics.itl.observe(0.02); metrics.e2e.observe(1.5)
    body = metrics.render()                            # text exposition format

Latency histograms are observed on the server's event loop as outputs reach it; the engine's
gauges and counters (running/waiting requests, KV cache usage, preemptions, tokens, prefix-cache
hits, routed-expert load per layer, speculative decoding's drafts and acceptances) are read from
the snapshot at scrape time, so a scrape never touches the engine itself. The registry is per server, not prometheus_client's global one.
"""

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0,
                   80.0)


GAUGES = [("moela:num_requests_running", "Sequences in the running batch.", "running"),
          ("moela:num_requests_waiting", "Sequences waiting to be scheduled.", "waiting"),
          ("moela:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).", "kv_cache_usage")]
COUNTERS = [("moela:num_preemptions", "Sequences preempted (recomputed later).", "num_preemptions"),
            ("moela:prompt_tokens", "Prompt tokens admitted.", "prompt_tokens"),
            ("moela:generation_tokens", "Tokens generated.", "generation_tokens"),
            ("moela:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", "prefix_cache_queries"),
            ("moela:prefix_cache_hits", "Prompt tokens found in the prefix cache.", "prefix_cache_hits")]


class ServerMetrics:
    def __init__(self, snapshot: Callable[[], dict]):
        self.registry = CollectorRegistry()
        self.ttft = Histogram("moela:time_to_first_token_seconds", "Time from request arrival to its first token.",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("moela:inter_token_latency_seconds", "Time between consecutive tokens of a request.",
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("moela:e2e_request_latency_seconds", "Time from request arrival to its last token.",
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(EngineCollector(snapshot))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class EngineCollector:
    def __init__(self, snapshot: Callable[[], dict]):
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot()
        if not s:  # still loading
            return
        for name, doc, key in GAUGES:
            yield GaugeMetricFamily(name, doc, value=s[key])
        for name, doc, key in COUNTERS:
            yield CounterMetricFamily(name, doc, value=s[key])
        queries = s["prefix_cache_queries"]
        yield GaugeMetricFamily("moela:prefix_cache_hit_rate", "prefix_cache_hits / prefix_cache_queries since start.",
                                value=s["prefix_cache_hits"] / queries if queries else 0.0)
        if "spec_decode_num_drafts" in s:
            yield from spec_decode_metrics(s)
        load = CounterMetricFamily("moela:routed_expert_tokens", "Tokens routed to each expert, per MoE layer.",
                                   labels=["layer", "expert"])
        for layer, counts in s["expert_load"].items():
            for expert, count in enumerate(counts):
                load.add_metric([str(layer), str(expert)], count)
        yield load


def spec_decode_metrics(s: dict) -> Iterator[Metric]:
    """Speculative decoding: vLLM's counters, and the acceptance rate and mean tokens per verifying step."""
    for key, doc in (("num_drafts", "Draft runs verified (one per sequence per step)."),
                     ("num_draft_tokens", "Draft tokens verified."), ("num_accepted_tokens", "Draft tokens accepted.")):
        yield CounterMetricFamily(f"moela:spec_decode_{key}", doc, value=s[f"spec_decode_{key}"])
    per_pos = CounterMetricFamily("moela:spec_decode_num_accepted_tokens_per_pos", "Draft tokens accepted, by draft position.",
                                  labels=["position"])
    for position, count in enumerate(s["spec_decode_num_accepted_tokens_per_pos"]):
        per_pos.add_metric([str(position)], count)
    yield per_pos
    drafts, tokens, accepted = (s[f"spec_decode_{k}"] for k in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"))
    yield GaugeMetricFamily("moela:spec_decode_acceptance_rate", "num_accepted_tokens / num_draft_tokens since start.",
                            value=accepted / tokens if tokens else 0.0)
    yield GaugeMetricFamily("moela:spec_decode_mean_acceptance_length",
                            "Tokens a verifying step yields per sequence, 1 + num_accepted_tokens / num_drafts: the "
                            "speed-up in steps.",
                            value=1 + accepted / drafts if drafts else 1.0)
