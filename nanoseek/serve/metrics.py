"""Prometheus metrics of one server (`GET /metrics`, text format), in vLLM's spirit and with its usual names.

    nanoseek:requests_total{endpoint, finish_reason}   finished engine requests (one per choice)
    nanoseek:prompt_tokens_total, nanoseek:generation_tokens_total
    nanoseek:time_to_first_token_seconds               histogram: submission to the first generated token
    nanoseek:inter_token_latency_seconds               histogram: between a request's tokens (per token)
    nanoseek:num_requests_waiting / _running           the engine's queue and batch
    nanoseek:batch_occupancy                           running / max_batch
    nanoseek:spec_decode_acceptance_rate               MTP drafts accepted / drafted (speculative engines)
    nanoseek:prefix_cache_hit_tokens_total             prompt tokens not computed again (a repeated prompt, a
                                                       prefix shared by the requests prefilled together)

Each app has its own registry, so several servers in one process keep their own counts.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..engine import Event

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    def __init__(self, max_batch: int):
        self.registry, self.max_batch = CollectorRegistry(), max_batch
        r = self.registry
        self.requests = Counter("nanoseek:requests", "Finished engine requests", ["endpoint", "finish_reason"],
                                registry=r)
        self.prompt_tokens = Counter("nanoseek:prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("nanoseek:generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("nanoseek:time_to_first_token_seconds", "Submission to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("nanoseek:inter_token_latency_seconds", "Time between a request's tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.waiting = Gauge("nanoseek:num_requests_waiting", "Requests waiting for a batch slot", registry=r)
        self.running = Gauge("nanoseek:num_requests_running", "Requests in the batch", registry=r)
        self.occupancy = Gauge("nanoseek:batch_occupancy", "Running requests / max batch", registry=r)
        self.acceptance = Gauge("nanoseek:spec_decode_acceptance_rate", "MTP drafts accepted / drafted", registry=r)
        self.prefix_hits = Counter("nanoseek:prefix_cache_hit_tokens", "Prompt tokens not computed again",
                                   registry=r)

    def text(self) -> bytes:
        return generate_latest(self.registry)

    def step(self, stats) -> None:
        """After an engine step (a worker.EngineStats): the queue, the batch, speculation and prefix reuse."""
        self.waiting.set(stats.waiting)
        self.running.set(stats.running)
        self.occupancy.set(stats.running / self.max_batch)
        self.acceptance.set(stats.acceptance_rate)
        self.prefix_hits.inc(stats.reused_prompt_tokens)

    def tokens(self, job, event: Event) -> None:
        """Count what one event of `job` (a worker.Job) brought: its new tokens, with the time to the first and the
        time between the others (several tokens in one event share its interval), and the request's end."""
        now, new = time.perf_counter(), len(event.new_token_ids)
        if new:
            if job.last_token_at is None:
                self.ttft.observe(now - job.submitted)
                gaps, since = new - 1, now  # the others came with the first
            else:
                gaps, since = new, job.last_token_at
            for _ in range(gaps):
                self.itl.observe((now - since) / gaps)
            job.last_token_at = now
            self.generation_tokens.inc(new)
        if event.finished:
            self.requests.labels(job.endpoint, event.completion.finish_reason).inc()
