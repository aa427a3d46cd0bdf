"""The server's Prometheus metrics, in a registry of their own (no process-global state).

Names follow vLLM's where there is one (`vllm:` becomes `nextn:`), so dashboards carry over:
requests running / waiting, time to first token, inter-token latency, end-to-end latency, prompt and
generation tokens, and the speculative-decoding counters (drafts, draft tokens, accepted tokens,
accepted tokens per draft position).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        label = ["model_name"]
        self.running = Gauge("nextn:num_requests_running", "Sequences in the decode batch.", label, registry=r)
        self.waiting = Gauge("nextn:num_requests_waiting", "Requests queued for a batch slot.", label, registry=r)
        self.http = Counter("nextn:http_requests", "HTTP requests by route and status.", ["route", "status"],
                            registry=r)  # fmt: skip
        self.success = Counter("nextn:request_success", "Finished requests by finish reason.",
                               [*label, "finished_reason"], registry=r)  # fmt: skip
        self.prompt_tokens = Counter("nextn:prompt_tokens", "Prompt tokens prefilled.", label, registry=r)
        self.generation_tokens = Counter("nextn:generation_tokens", "Tokens generated.", label, registry=r)
        self.ttft = Histogram("nextn:time_to_first_token_seconds", "Arrival to first token.", label,
                              buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.itl = Histogram("nextn:inter_token_latency_seconds", "Time per output token after the first.", label,
                             buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.e2e = Histogram("nextn:e2e_request_latency_seconds", "Arrival to the last token.", label,
                             buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.drafts = Counter("nextn:spec_decode_num_drafts", "Verify steps that checked at least one draft.", label,
                              registry=r)  # fmt: skip
        self.draft_tokens = Counter("nextn:spec_decode_num_draft_tokens", "Draft tokens checked.", label, registry=r)
        self.accepted_tokens = Counter("nextn:spec_decode_num_accepted_tokens", "Draft tokens accepted.", label,
                                       registry=r)  # fmt: skip
        self.accepted_per_pos = Counter("nextn:spec_decode_num_accepted_tokens_per_pos",
                                        "Draft tokens accepted at each draft position.", [*label, "position"],
                                        registry=r)  # fmt: skip
        self.name = model_name

    def finished(self, reason: str, stats: dict, accepted_per_position: list[int]) -> None:
        """A request left the engine: its finish reason and its decoding counters (decoder.Stats)."""
        n = self.name
        self.success.labels(n, reason).inc()
        self.prompt_tokens.labels(n).inc(stats["prompt_tokens"])
        self.generation_tokens.labels(n).inc(stats["new_tokens"])
        self.drafts.labels(n).inc(sum(1 for k in stats["step_draft"] if k))
        self.draft_tokens.labels(n).inc(stats["drafted"])
        self.accepted_tokens.labels(n).inc(stats["accepted"])
        for pos, count in enumerate(accepted_per_position):
            if count:
                self.accepted_per_pos.labels(n, str(pos)).inc(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
