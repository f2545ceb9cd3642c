"""Prometheus metrics of one server (names in docs/server.md), in their own registry so
that several servers in one process (tests) do not collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: How a Generate / GenerateStream call ended (docs/server.md, "Outcomes").
OUTCOMES = (
    "ok",
    "invalid",
    "overloaded",
    "refused_deadline",
    "deadline",
    "client_deadline",
    "cancelled",
    "backend_error",
    "internal",
)
_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "moe_scheduler_requests",
            "Finished calls by outcome, counted once after the last message",
            ["outcome"],
            registry=r,
        )
        #: The counter of each outcome, looked up once (labels() takes a lock each time).
        self.outcome = {outcome: self.requests.labels(outcome) for outcome in OUTCOMES}
        self.ttft = Histogram(
            "moe_scheduler_ttft_seconds",
            "Time to first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.total = Histogram(
            "moe_scheduler_request_seconds",
            "Request latency, arrival to last token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "moe_scheduler_queue_seconds",
            "Wait for a rank slot",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.rank_in_flight = Gauge(
            "moe_scheduler_rank_in_flight",
            "Requests in flight per DP rank",
            ["sglang_instance", "rank", "node"],
            registry=r,
        )
        self.rank_healthy = Gauge(
            "moe_scheduler_rank_healthy",
            "1 if the DP rank takes requests",
            ["sglang_instance", "rank"],
            registry=r,
        )
        self.backend_running = Gauge(
            "moe_scheduler_backend_running",
            "SGLang running requests (/v1/loads)",
            ["sglang_instance", "rank"],
            registry=r,
        )
        self.backend_waiting = Gauge(
            "moe_scheduler_backend_waiting",
            "SGLang waiting requests (/v1/loads)",
            ["sglang_instance", "rank"],
            registry=r,
        )
        self.inter_node_bytes = Counter(
            "moe_scheduler_inter_node_bytes",
            "Inter-node all-to-all bytes, measured from returned routed experts",
            registry=r,
        )
        self.estimated_inter_node_bytes = Counter(
            "moe_scheduler_estimated_inter_node_bytes",
            "Inter-node bytes expected from the predictions at dispatch",
            registry=r,
        )
        self.remote_hits = Counter(
            "moe_scheduler_remote_hits", "(token, layer, expert) hits on another node", registry=r
        )
        self.token_layers = Counter(
            "moe_scheduler_token_layers", "Accounted (token, MoE layer) pairs", registry=r
        )
        self.prediction_hit_ratio = Gauge(
            "moe_scheduler_prediction_hit_ratio",
            "Share of finished requests whose measured best node was the chosen node",
            registry=r,
        )
        self.reroutes = Counter(
            "moe_scheduler_reroutes", "Requests re-dispatched after a rank failed", registry=r
        )
        self.in_progress = Gauge(
            "moe_scheduler_requests_in_progress", "Calls admitted and not finished", registry=r
        )
        self.loop_lag = Gauge(
            "moe_scheduler_loop_lag_seconds",
            "How late the serving event loop runs (averaged over about a second)",
            registry=r,
        )
        self.telemetry = Gauge(
            "moe_scheduler_telemetry_requests",
            "Requests on the learning path: routed experts sampled, accounted, dropped",
            ["state"],
            registry=r,
        )
        self.admin_calls = Counter(
            "moe_scheduler_admin_calls", "Admin RPCs by result", ["method", "result"], registry=r
        )
        self.config_reloads = Counter(
            "moe_scheduler_config_reloads", "Configuration reloads", ["result"], registry=r
        )
        for result in ("ok", "rejected"):
            self.config_reloads.labels(result)
