"""Replica health: active probes of each replica's health path, and passive ejection on failures.

A replica is ejected when a request to it fails to connect or gets a 5xx (passive), or when it fails
`unhealthy_after` probes in a row; it is re-admitted after `healthy_after` probes in a row pass. A backend
without a health path (an external API) has no probes: an ejected replica comes back after `eject_s`.
"""

from __future__ import annotations

import asyncio
import logging
import time

import httpx

from tokenmill.router.balancing import Pool, Replica
from tokenmill.router.config import HealthConfig
from tokenmill.router.metrics import RouterMetrics

logger = logging.getLogger("tokenmill.router")


class HealthMonitor:
    def __init__(self, pools: dict[str, Pool], config: HealthConfig, metrics: RouterMetrics) -> None:
        self.pools = pools
        self.config = config
        self.metrics = metrics
        for pool in pools.values():
            for replica in pool.replicas:
                self._set_gauge(replica)

    def _set_gauge(self, replica: Replica) -> None:
        self.metrics.backend_healthy.labels(replica.backend, replica.url).set(1 if replica.healthy else 0)

    def eject(self, replica: Replica, reason: str) -> None:
        """Take a replica out of rotation (passive: a request to it failed)."""
        replica.num_probe_passes = 0
        replica.last_error = reason
        pool = self.pools[replica.backend]
        if pool.config.health_path is None:
            replica.ejected_until = time.monotonic() + self.config.eject_s
        if replica.healthy:
            replica.healthy = False
            self.metrics.ejections.labels(replica.backend, replica.url, reason).inc()
            logger.warning("ejected replica %s of backend %r: %s", replica.url, replica.backend, reason)
            self._set_gauge(replica)

    def admit(self, replica: Replica) -> None:
        if not replica.healthy:
            replica.healthy = True
            replica.last_error = None
            logger.info("re-admitted replica %s of backend %r", replica.url, replica.backend)
            self._set_gauge(replica)

    async def probe(self, client: httpx.AsyncClient, pool: Pool, replica: Replica) -> None:
        if pool.config.health_path is None:
            if not replica.healthy and time.monotonic() >= replica.ejected_until:
                self.admit(replica)
            return
        try:
            response = await client.get(replica.root_url + pool.config.health_path, timeout=self.config.timeout_s)
            ok = response.status_code == 200
            error = f"health probe answered {response.status_code}"
        except httpx.HTTPError as e:
            ok, error = False, f"health probe failed: {type(e).__name__}"
        if ok:
            replica.num_probe_failures = 0
            replica.num_probe_passes += 1
            if replica.num_probe_passes >= self.config.healthy_after:
                self.admit(replica)
        else:
            replica.num_probe_passes = 0
            replica.num_probe_failures += 1
            if replica.num_probe_failures >= self.config.unhealthy_after and replica.healthy:
                self.eject(replica, "probe")
            replica.last_error = error

    async def probe_all(self, client: httpx.AsyncClient) -> None:
        await asyncio.gather(*(self.probe(client, pool, replica)
                               for pool in self.pools.values() for replica in pool.replicas))

    async def run(self) -> None:
        async with httpx.AsyncClient() as client:
            while True:
                try:
                    await self.probe_all(client)
                except Exception:  # never let one bad probe stop the monitor
                    logger.exception("health probes failed")
                await asyncio.sleep(self.config.interval_s)
