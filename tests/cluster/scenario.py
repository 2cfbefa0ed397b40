"""One fault scenario of cluster mode: a name server, model-server replica processes on a real etcd
cluster, 4+ controllers writing, 6+ viewers spread over the replicas; and the final check, from the
controllers' own records and the viewers' own recordings."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from kit import Controller, EtcdCluster, all_history, check_history, retrying

from remote_mvc import ModelClient, Viewer, ViewerHost
from remote_mvc.testing import ServiceProcess, Stack, wait_until

CLUSTER_SETTINGS = {"call_timeout": 3.0, "lease_seconds": 3.0, "register_interval": 0.5}


class Scenario:
    """Everything of one test; :meth:`close` stops it all (the etcd cluster belongs to the module)."""

    def __init__(self, tmp_path: Path, etcd: EtcdCluster, replicas: int = 3, hosts: int = 3,
                 viewers_per_host: int = 2, controllers: int = 4,
                 replica_overrides: dict[str, dict[str, Any]] | None = None) -> None:
        self.tmp_path = tmp_path
        self.etcd = etcd
        self.prefix = f"/s-{tmp_path.name[-20:]}-{time.monotonic_ns() % 10**9}"
        self.stack = Stack(tmp_path, store=etcd.store_setting, etcd_prefix=self.prefix, **CLUSTER_SETTINGS).start()
        self.replicas: dict[str, ServiceProcess] = {}
        for i in range(replicas):
            self.start_replica(f"r{i}", **(replica_overrides or {}).get(f"r{i}", {}))
        self.hosts: list[ViewerHost] = []
        self.viewers: list[Viewer] = []
        for h in range(hosts):
            host, views = self.stack.viewers(viewers_per_host, prefix=f"h{h}-viewer")
            self.hosts.append(host)
            self.viewers.extend(views)
        self.controllers = [Controller(i, self.stack.settings.replace(identity="controller"))
                            for i in range(controllers)]
        for c in self.controllers:
            c.start()
        self.reader = self.stack.client("controller", retry_seconds=30.0)

    def start_replica(self, name: str, timeout: float = 30.0, **overrides: Any) -> ServiceProcess:
        proc = self.stack.process("model", name=f"model-{name}", replica=name, metrics_port=0, **overrides)
        proc.wait_for_log(lambda r: r.get("event") == "registered", timeout)
        self.replicas[name] = proc
        return proc

    def metrics(self, name: str) -> str:
        """A replica's /metrics text."""
        started = self.replicas[name].wait_for_log(lambda r: r.get("event") == "service_started", 5)
        with urllib.request.urlopen(f"http://127.0.0.1:{started['metrics_port']}/metrics", timeout=5) as r:
            return r.read().decode()

    def replicas_serving_viewers(self) -> set[str]:
        """The replicas that hold at least one of our viewers' subscriptions right now."""
        serving = set()
        for name, proc in self.replicas.items():
            if proc.proc.poll() is not None:
                continue
            for line in self.metrics(name).splitlines():
                if line.startswith("remote_mvc_viewers_connected{") and float(line.rsplit(" ", 1)[1]) > 0:
                    serving.add(name)
        return serving

    def replica_client(self, name: str) -> ModelClient:
        """A client of one replica only (found by its own name), that does not retry."""
        return self.stack.client("controller", model=f"{self.stack.settings.model_name}.replica.{name}",
                                 retry_seconds=0)

    def wait_progress(self, changes: int, timeout: float = 60.0) -> None:
        """Until the controllers have had ``changes`` more changes acknowledged."""
        start = sum(len(c.acked) for c in self.controllers)
        wait_until(lambda: sum(len(c.acked) for c in self.controllers) >= start + changes, timeout,
                   interval=0.05, message=f"{changes} more acknowledged changes")

    def finish(self, allow_refusals: bool = False) -> dict[str, Any]:
        """Stop the controllers; check nothing lost or doubled and every viewer converged."""
        for c in self.controllers:
            c.halt()
        refused = [e for c in self.controllers for e in c.refused]
        if not allow_refusals:
            assert not refused, f"a controller that retries as documented saw errors: {refused[:5]}"
        def agreed() -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
            # the reader's calls may land on different replicas, one of them still catching up
            # (a replica just reconnected to etcd): read until a head and a history agree
            head = retrying(lambda: self.reader.snapshot())
            events = retrying(lambda: all_history(self.reader))
            return (head, events) if events and events[-1]["revision"] == head["revision"] else None

        head, events = wait_until(agreed, 60, interval=0.2, message="a head and a history that agree")
        counts = check_history(events, self.controllers)
        for v in self.viewers:
            assert v.wait_for(head["revision"], 60), f"{v.viewer_id} stuck at {v.revision} of {head['revision']}"
            assert v.values == head["values"], f"{v.viewer_id} did not converge"
            received = v.received or []
            assert received == sorted(set(received)), f"{v.viewer_id} saw a revision twice or out of order"
            jumps = sum(1 for a, b in zip(received, received[1:], strict=False) if b != a + 1)
            assert jumps <= v.snapshots - 1, f"{v.viewer_id} skipped revisions without a snapshot"
        counts["refused"] = len(refused)
        counts["snapshots"] = sum(v.snapshots for v in self.viewers)
        print("scenario:", json.dumps(counts))
        return counts

    def close(self) -> None:
        for c in self.controllers:
            if c.is_alive():
                c.halt()
        self.stack.close()


def viewer_replica_spread(scenario: Scenario) -> None:
    wait_until(lambda: len(scenario.replicas_serving_viewers()) >= 2, 20,
               message="viewers spread over several replicas")

