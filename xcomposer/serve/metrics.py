"""Prometheus metrics of a server (`GET /metrics`), on a registry of its own per app."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                    30.0, 60.0)


class Metrics:
    """Requests by status, queue depth, running sequences, tokens, time to first token and
    inter-token latency. The engine calls `observe_*` from its thread (prometheus_client is
    thread-safe); the HTTP layer counts requests it refuses itself (`observe_http`)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("xcomposer_requests", "Finished requests by status (HTTP status for refusals; "
                                "stop/length/cancelled/error for generations)", ["status"], registry=r)
        self.responses = Counter("xcomposer_http_responses", "HTTP responses by status code and endpoint",
                                 ["status", "endpoint"], registry=r)
        self.queue_depth = Gauge("xcomposer_queue_depth", "Requests waiting for a batch row", registry=r)
        self.running = Gauge("xcomposer_running_sequences", "Sequences in the batch", registry=r)
        self.prompt_tokens = Counter("xcomposer_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("xcomposer_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("xcomposer_time_to_first_token_seconds", "Submission to first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.cache = Gauge("xcomposer_kv_cache", "KV block pool and prefix cache: blocks_total/used/free/cached, "
                           "prefix_queried_tokens, prefix_hit_tokens, prefix_hit_rate, evictions", ["stat"], registry=r)
        self.turns_dropped = Counter("xcomposer_chat_turns_dropped", "Oldest exchanges left out of chat prompts to fit "
                                     "the session length", registry=r)
        self.itl = Histogram("xcomposer_inter_token_latency_seconds", "Time between two tokens of a sequence",
                             buckets=_LATENCY_BUCKETS, registry=r)

    def observe_engine(self, queue_depth: int, running: int) -> None:
        self.queue_depth.set(queue_depth)
        self.running.set(running)

    def observe_cache(self, stats: dict) -> None:
        """The engine's KV pool and prefix cache (`Engine.cache_stats()`)."""
        for name, value in stats.items():
            self.cache.labels(stat=name).set(value)

    def observe_token(self, since: float, now: float, first: bool) -> None:
        (self.ttft if first else self.itl).observe(max(now - since, 0.0))

    def observe_done(self, status: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.requests.labels(status=status).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)

    def observe_response(self, status: int, endpoint: str) -> None:
        self.responses.labels(status=str(status), endpoint=endpoint).inc()

    def observe_http(self, status: int) -> None:
        self.requests.labels(status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["Metrics"]
