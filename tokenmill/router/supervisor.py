"""`launch:` backends: local `tokenmill serve` processes started by the router and restarted when they exit.

Each replica gets a free loopback port chosen once, so its URL stays the same across restarts. A replica that
exits is restarted after restart_delay_s, doubled after each crash that follows a short run (at most 30 s).
The health monitor admits a replica once its /health answers 200, so a loading or restarting replica takes no
traffic. When the router stops, its replicas get SIGTERM (and SIGKILL after 15 s).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tokenmill.router.config import BackendConfig, LaunchConfig, RouterConfig
from tokenmill.router.metrics import RouterMetrics

logger = logging.getLogger("tokenmill.router")

MAX_RESTART_DELAY_S = 30.0
# A replica that ran this long before exiting restarts after the base delay again.
STABLE_RUN_S = 60.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class LaunchedReplica:
    backend: BackendConfig
    launch: LaunchConfig
    index: int
    port: int
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    num_restarts: int = 0
    delay_s: float = 0.0
    log_file: IO | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        args = list(self.launch.args)
        if self.backend.model != self.launch.model and "--served-model-name" not in args:
            args += ["--served-model-name", self.backend.model]
        return [sys.executable, "-m", "tokenmill.entrypoints.cli", "serve", self.launch.model, *args,
                "--host", "127.0.0.1", "--port", str(self.port)]

    def spawn(self) -> None:
        stdout = None
        if self.launch.log_dir:
            Path(self.launch.log_dir).mkdir(parents=True, exist_ok=True)
            if self.log_file is None:
                path = Path(self.launch.log_dir) / f"{self.backend.name}-{self.index}.log"
                self.log_file = open(path, "a")  # noqa: SIM115 - closed by the supervisor
            stdout = self.log_file
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(self.command(), stdout=stdout, stderr=subprocess.STDOUT if stdout else None,
                                        env=env)
        self.started_at = time.monotonic()
        logger.info("launched replica %d of backend %r (pid %d) at %s", self.index, self.backend.name,
                    self.process.pid, self.url)


class Supervisor:
    def __init__(self, config: RouterConfig, metrics: RouterMetrics) -> None:
        self.metrics = metrics
        self.replicas: dict[str, list[LaunchedReplica]] = {}  # backend name -> its launched replicas
        for name, backend in config.backends.items():
            if backend.launch is not None:
                self.replicas[name] = [LaunchedReplica(backend, backend.launch, i, free_port())
                                       for i in range(backend.launch.replicas)]
        self._task: asyncio.Task | None = None
        self._stopping = False

    def urls(self, backend: str) -> list[str]:
        return [r.url for r in self.replicas.get(backend, [])]

    def pid(self, url: str) -> int | None:
        for replica in self.all():
            if replica.url == url and replica.process is not None and replica.process.poll() is None:
                return replica.process.pid
        return None

    def all(self) -> list[LaunchedReplica]:
        return [r for replicas in self.replicas.values() for r in replicas]

    async def start(self) -> None:
        for replica in self.all():
            replica.spawn()
        if self.replicas:
            self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while not self._stopping:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for replica in self.all():
                process = replica.process
                if process is None or process.poll() is None or self._stopping:
                    continue
                ran = now - replica.started_at
                base = replica.launch.restart_delay_s
                replica.delay_s = base if ran >= STABLE_RUN_S else min(MAX_RESTART_DELAY_S,
                                                                       max(base, replica.delay_s * 2))
                logger.warning("replica %d of backend %r exited with %s after %.1f s: restarting in %.1f s",
                               replica.index, replica.backend.name, process.returncode, ran, replica.delay_s)
                replica.process = None
                asyncio.get_running_loop().call_later(replica.delay_s, self._restart, replica)

    def _restart(self, replica: LaunchedReplica) -> None:
        if self._stopping:
            return
        replica.num_restarts += 1
        self.metrics.backend_restarts.labels(replica.backend.name).inc()
        replica.spawn()

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
        live = [r.process for r in self.all() if r.process is not None and r.process.poll() is None]
        for process in live:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15.0
        for process in live:
            try:
                await asyncio.to_thread(process.wait, max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for replica in self.all():
            if replica.log_file is not None:
                replica.log_file.close()
