"""A fleet's layout on one host: three agents (ours, one per service, as on three hosts) → a gateway
(a real OpenTelemetry Collector with the `loadbalancing` exporter, static resolver, routing by trace
id) → two backend collectors (file exporter). The configs are the ones in deploy/gateway/, with
loopback ports filled in.

The chain A -> B -> C (tests/fixtures/go/httpchain) makes traces of five spans that three agents
see in parts (A's two, B's two, C's one): every trace must end up whole on one backend. Then one
backend is stopped: the gateway keeps no queue of its own (deploy/gateway/README.md says why), so
the agents' exports fail and stay in our queue, are retried, and are delivered once the backend is
back; then the gateway itself restarts. Nothing is lost: every span of every request arrives, and no
agent counts a span dropped.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from collector.spans import KIND_CLIENT, KIND_SERVER, from_json_dict
from tests.support.ci import needs_root
from tests.support.collector import CollectorProcess, json_lines, wait_for
from tests.support.gobuild import build_go_fixture
from tests.support.httpchain import Chain
from tests.support.otelcol import RealCollector

pytestmark = [*needs_root(), pytest.mark.timeout(600)]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "gateway"
ID = re.compile(r"/chain/([A-Za-z0-9_-]+)")
ROLES = {"A server", "A client", "B server", "B client", "C server"}


def metric(col: CollectorProcess, name: str) -> float:
    """The sum of a self-metric's series; a name the collector does not serve is an error."""
    total, seen = 0.0, False
    for line in col.scrape().splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rpartition(" ")[2])
            seen = True
    assert seen, f"{name} not served"
    return total


def gateway_exporters(backends: list[RealCollector]) -> dict[str, Any]:
    """deploy/gateway/gateway.yaml's exporter, pointed at these backends."""
    cfg = yaml.safe_load((DEPLOY / "gateway.yaml").read_text())
    lb = cfg["exporters"]["loadbalancing"]
    lb["resolver"] = {"static": {"hostnames": [f"127.0.0.1:{b.grpc_port}" for b in backends]}}
    return {"loadbalancing": lb}


def agent_config(pid: int, service: str, gateway: RealCollector) -> dict[str, Any]:
    """deploy/gateway/agent.yaml, for one service and the gateway on loopback."""
    cfg = yaml.safe_load((DEPLOY / "agent.yaml").read_text())
    cfg["receivers"]["ebpf_go"] = {"targets": [{"pid": pid, "service_name": service}],
                                   "discovery_interval": "200ms", "instrumentations": {"database_sql": False}}
    cfg["exporters"]["otlp"]["endpoint"] = f"127.0.0.1:{gateway.grpc_port}"
    cfg["exporters"]["otlp"]["retry_on_failure"].update(initial_interval="200ms", max_interval="1s")
    cfg["service"].pop("telemetry", None)     # the test's own metrics port
    cfg["service"].pop("extensions", None)
    cfg.pop("extensions", None)
    return cfg


class Fleet:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.binary = workdir / "httpchain"
        shutil.copy(build_go_fixture("httpchain", "1.26"), self.binary)
        self.chain = Chain()
        self.backends: list[RealCollector] = []
        self.agents: dict[str, CollectorProcess] = {}
        self.gateway: RealCollector | None = None
        self.outputs: dict[int, list[Path]] = {0: [], 1: []}   # backend index -> its output files

    def start(self) -> None:
        self.chain.start(self.binary)
        for i in (0, 1):
            self.backends.append(RealCollector(self.workdir, name=f"backend{i}").start())
            self.outputs[i].append(self.backends[i].out)
        self.gateway = RealCollector(self.workdir, name="gateway",
                                     exporters=gateway_exporters(self.backends)).start()
        for role, proc in self.chain.procs.items():
            self.agents[role] = CollectorProcess(agent_config(proc.pid, f"svc-{role}", self.gateway), self.workdir)
        for col in self.agents.values():
            wait_for(lambda c=col: metric(c, "otelgo_ebpf_processes_instrumented") == 1, 60, "agent attached")

    def restart_backend(self, i: int, generation: int) -> None:
        old = self.backends[i]
        self.backends[i] = RealCollector(self.workdir, name=f"backend{i}-{generation}",
                                         grpc_port=old.grpc_port, http_port=old.http_port).start()
        self.outputs[i].append(self.backends[i].out)

    def restart_gateway(self) -> None:
        assert self.gateway is not None
        old = self.gateway
        old.stop()
        self.gateway = RealCollector(self.workdir, name="gateway-2", exporters=gateway_exporters(self.backends),
                                     grpc_port=old.grpc_port, http_port=old.http_port)

    def close(self) -> list[int]:
        self.chain.stop()
        rcs = [a.stop() for a in self.agents.values()]
        for c in [self.gateway, *self.backends]:
            if c is not None:
                c.stop()
        return rcs

    def received(self) -> dict[str, dict[int, dict[str, int]]]:
        """request id -> backend -> role -> how many copies of that span arrived there."""
        roles = {p.pid: r for r, p in self.chain.procs.items()}
        out: dict[str, dict[int, dict[str, int]]] = {}
        for i, files in self.outputs.items():
            for f in files:
                for doc in json_lines(f):
                    for rs, _, s in from_json_dict(doc).iter_spans():
                        m = ID.search(str(s.attributes.get("url.path") or s.attributes.get("url.full") or ""))
                        if m is None:
                            continue
                        side = "server" if s.kind == KIND_SERVER else "client" if s.kind == KIND_CLIENT else "?"
                        role = f"{roles.get(int(rs.resource.attributes['process.pid']), '?')} {side}"
                        per = out.setdefault(m.group(1), {}).setdefault(i, {})
                        per[role] = per.get(role, 0) + 1
        return out

    def wait_whole(self, ids: list[str], timeout: float) -> dict[str, dict[int, dict[str, int]]]:
        def whole() -> bool:
            got = self.received()
            return all(set().union(*got.get(i, {}).values()) >= ROLES if got.get(i) else False for i in ids)
        wait_for(whole, timeout, f"all five spans of {len(ids)} requests at the backends")
        time.sleep(1)     # and any late copy
        return self.received()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    try:
        f.start()
        yield f
    finally:
        rcs = f.close()
    assert rcs == [0, 0, 0]


def check_one_backend_each(got: dict[str, dict[int, dict[str, int]]], ids: list[str]) -> dict[int, int]:
    """Each request's trace is whole on exactly one backend; how many traces each backend got."""
    per_backend = {0: 0, 1: 0}
    for i in ids:
        assert len(got[i]) == 1, f"request {i}: spans on both backends: {got[i]}"
        (backend, roles), = got[i].items()
        assert set(roles) == ROLES, (i, roles)
        per_backend[backend] += 1
    return per_backend


def test_traces_whole_on_one_backend_and_nothing_lost_while_one_is_down(fleet: Fleet) -> None:
    ids = [f"lb{i}" for i in range(30)]
    for i in ids:
        fleet.chain.get(i)
    got = fleet.wait_whole(ids, timeout=60)
    per_backend = check_one_backend_each(got, ids)
    # 30 random trace ids over two backends: both get some (all on one: p = 2**-29)
    assert per_backend[0] > 0 and per_backend[1] > 0, per_backend
    assert all(n == 1 for i in ids for n in got[i][next(iter(got[i]))].values()), "a span arrived twice"

    # backend 1 goes away: the gateway fails those exports back to the agents, which keep and retry them
    fleet.backends[1].stop()
    down = [f"down{i}" for i in range(30)]
    for i in down:
        fleet.chain.get(i)
    wait_for(lambda: any("Will retry the request after interval" in a.log() for a in fleet.agents.values()),
             30, "an agent retrying")
    time.sleep(2)
    fleet.restart_backend(1, generation=2)
    got = fleet.wait_whole(down, timeout=90)
    per_backend = check_one_backend_each(got, down)
    assert per_backend[1] > 0, per_backend    # some of them waited for the restarted backend
    copies = sum(n - 1 for i in down for roles in got[i].values() for n in roles.values())
    # a batch half delivered (to the live backend) is retried whole: at-least-once, as the collector is
    print(f"while backend 1 was down: traces per backend {per_backend}, spans delivered twice {copies}")
    for role, agent in fleet.agents.items():
        assert metric(agent, "otelcol_exporter_send_failed_spans_total") == 0, role
        assert metric(agent, "otelcol_exporter_enqueue_failed_spans_total") == 0, role

    # the gateway itself restarts: the agents' exports are refused meanwhile, kept and retried
    fleet.restart_gateway()          # stopped here, started below
    later = [f"gw{i}" for i in range(10)]
    for i in later:
        fleet.chain.get(i)
    time.sleep(3)                    # the agents' batches (1 s) are sent, refused, and wait
    assert not any(i in fleet.received() for i in later)
    assert fleet.gateway is not None
    fleet.gateway.start()
    check_one_backend_each(fleet.wait_whole(later, timeout=90), later)
    for role, agent in fleet.agents.items():
        assert metric(agent, "otelcol_exporter_send_failed_spans_total") == 0, role
        assert metric(agent, "otelcol_exporter_enqueue_failed_spans_total") == 0, role
        assert metric(agent, "otelcol_exporter_sent_spans_total") >= (2 if role != "C" else 1) * 70, role


@pytest.mark.parametrize("name", ["gateway.yaml", "backend.yaml"])
def test_gateway_and_backend_configs_are_valid_for_the_real_collector(name: str) -> None:
    import subprocess

    from tests.support.otelcol import build_otelcol
    proc = subprocess.run([str(build_otelcol()), "validate", "--config", str(DEPLOY / name)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
