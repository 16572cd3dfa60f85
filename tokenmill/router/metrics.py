"""The router's Prometheus metrics (own registry, so several routers can live in one process in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from tokenmill.metrics.prometheus import UNTAGGED

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
PREFIX = "tokenmill_router:"


def feature_label(feature: str | None) -> str:
    return feature if feature else UNTAGGED


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(PREFIX + "requests", "Requests answered, by route, answering backend and HTTP status.",
                                ["route", "backend", "status"], registry=r)
        self.rejected = Counter(PREFIX + "rejected_requests", "Requests refused before routing (auth, rate limit, "
                                "bad request, no route).", ["reason"], registry=r)
        self.escalations = Counter(PREFIX + "escalations", "Requests escalated to a stronger tier, by failed check.",
                                   ["route", "reason"], registry=r)
        self.failovers = Counter(PREFIX + "failovers", "Attempts abandoned for another replica or backend.",
                                 ["route", "backend", "reason"], registry=r)
        self.stream_errors = Counter(PREFIX + "stream_errors", "Streams cut by a backend failure after bytes reached "
                                     "the client.", ["backend"], registry=r)
        self.backend_healthy = Gauge(PREFIX + "backend_healthy", "1 while the replica takes traffic, 0 when ejected.",
                                     ["backend", "replica"], registry=r)
        self.backend_outstanding = Gauge(PREFIX + "backend_outstanding_requests", "Requests in flight per replica.",
                                         ["backend", "replica"], registry=r)
        self.ejections = Counter(PREFIX + "ejections", "Replicas taken out of rotation.", ["backend", "replica",
                                 "reason"], registry=r)
        self.latency = Histogram(PREFIX + "backend_latency_seconds", "Seconds from sending a request to a backend "
                                 "to its last byte.", ["backend"], buckets=LATENCY_BUCKETS, registry=r)
        self.cost = Counter(PREFIX + "cost_usd", "USD spent, from the backends' prices.", ["feature", "backend"],
                            registry=r)
        # A gauge: an escalated request costs more than the strong tier alone, so the total can go down.
        self.saved = Gauge(PREFIX + "saved_usd_total", "USD saved against sending every request to its route's "
                           "escalation tier (what that would have cost minus what was spent).", ["feature"],
                           registry=r)
        self.backend_restarts = Counter(PREFIX + "backend_restarts", "Launched replicas restarted after exiting.",
                                        ["backend"], registry=r)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
