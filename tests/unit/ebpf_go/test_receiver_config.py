"""ebpf_go receiver config: defaults with no options, selectors, validation messages; what a start
leaves behind of a collector that was killed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from receiver.ebpf_go.config import EbpfGoConfig
from receiver.ebpf_go.receiver import factory


def test_defaults_need_no_options() -> None:
    c = EbpfGoConfig.model_validate({})
    assert c.targets == []
    assert c.kernel_headers == "auto"
    assert c.propagation == "auto"
    assert c.ring_buffer_size == 4 << 20
    assert c.max_inflight_calls == 16384
    assert c.discovery_interval == 1.0
    assert c.program_linger == 30.0
    i = c.instrumentations
    assert (i.net_http_server, i.net_http_client, i.database_sql) == (True,) * 3
    assert factory.type == "ebpf_go" and factory.config_model is EbpfGoConfig


def test_targets_as_a_user_writes_them() -> None:
    c = EbpfGoConfig.model_validate({
        "targets": [
            {"exe_path": "/srv/*/api", "service_name": "api", "attributes": {"team": "a", "tier": 2}},
            {"pid": 42},
            {"pid": [1, 2], "name": "^shop-", "open_ports": [8080]},
        ],
        "instrumentations": {"database_sql": False},
        "propagation": "stitch",
        "discovery_interval": "250ms",
    })
    assert c.targets[0].exe_path == "/srv/*/api" and c.targets[0].attributes == {"team": "a", "tier": 2}
    assert c.targets[1].pid == [42]
    assert c.targets[2].pid == [1, 2] and c.targets[2].open_ports == [8080]
    assert c.instrumentations.database_sql is False and c.instrumentations.net_http_server is True
    assert c.discovery_interval == 0.25


def test_unknown_key_include_is_refused() -> None:
    with pytest.raises(ValidationError):
        EbpfGoConfig.model_validate({"include": [{"pid": 7}]})


@pytest.mark.parametrize("doc,words", [
    ({"targets": [{"exe": "/x"}]}, "exe"),
    ({"instrumentations": {"kafka": True}}, "kafka"),
    ({"propagation": "inject"}, "propagation"),
    ({"ring_buffer_size": 5000}, "power of two"),
    ({"max_inflight_calls": 1}, "max_inflight_calls"),
    ({"targets": [{"name": "("}]}, "regular expression"),
    ({"discovery_interval": "1"}, "duration"),
])
def test_bad_values_are_named(doc: dict, words: str) -> None:
    with pytest.raises(ValidationError) as e:
        EbpfGoConfig.model_validate(doc)
    assert words in str(e.value)


def test_missing_privileges_fail_the_start_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # As in the Go collector, a receiver that cannot start fails the collector's start (the service
    # prints `failed to start "ebpf_go" receiver: <this>` and exits 1): a collector that runs and
    # traces nothing would mislead.
    from collector.component import ComponentID
    from collector.errors import PrivilegeError
    from collector.telemetry import ComponentTelemetry, SelfMetrics
    from receiver.ebpf_go import preflight

    monkeypatch.setattr(preflight, "missing_capabilities", lambda: ["CAP_SYS_ADMIN", "CAP_SYS_PTRACE"])
    monkeypatch.setattr(preflight, "check_bcc", lambda: None)
    r = factory.create(ComponentID("ebpf_go"), EbpfGoConfig(), ComponentTelemetry("receiver", "ebpf_go",
                                                                                  SelfMetrics()), None)
    with pytest.raises(PrivilegeError) as e:
        r.start(None)
    assert not r.enabled
    assert str(e.value) == (
        f"the ebpf_go receiver needs root (uid is {os.getuid()}) or the capabilities CAP_SYS_ADMIN (the kernel "
        "opens uprobes for no less) and CAP_SYS_PTRACE; missing: CAP_SYS_ADMIN, CAP_SYS_PTRACE: run as root, or "
        "grant `setcap cap_sys_admin,cap_sys_ptrace,cap_dac_read_search+ep` (in a container: --pid=host with "
        "those capabilities, see deploy/)")
    r.shutdown()


def test_instrumentations_are_the_registry() -> None:
    # One switch per probe of the registry, on by default; an unknown key is refused with a hint.
    from receiver.ebpf_go.probes import PROBES
    cfg = EbpfGoConfig.model_validate({"instrumentations": {"grpc_client": False}})
    assert {p.name: getattr(cfg.instrumentations, p.name) for p in PROBES} == {
        "net_http_server": True, "grpc_server": True, "functions": True, "net_http_client": True,
        "database_sql": True, "grpc_client": False}
    with pytest.raises(ValidationError) as e:
        EbpfGoConfig.model_validate({"instrumentations": {"grpc": True}})
    assert "grpc" in str(e.value)


@pytest.mark.parametrize("functions,message", [
    ([{"symbol": ""}], "symbol: name a Go function"),
    ([{"symbol": "*"}], "symbol: name a Go function"),
    ([{"symbol": "main.(*S) Get"}], "has a space"),
    ([{"symbol": "main.f", "max_spans_per_second": 0}], "max_spans_per_second: 0 must be between 1 and 10000000"),
    ([{"symbol": "main.f", "min_duration": "-1ms"}], "min_duration"),
    ([{"symbol": "main.f", "colour": "red"}], "colour"),
])
def test_functions_refused(functions: list[dict[str, object]], message: str) -> None:
    with pytest.raises(ValidationError) as e:
        EbpfGoConfig.model_validate({"functions": functions})
    assert message in str(e.value)


def test_functions_and_their_switch() -> None:
    with pytest.raises(ValidationError) as e:
        EbpfGoConfig.model_validate({"functions": [{"symbol": "main.f"}], "instrumentations": {"functions": False}})
    assert "instrumentations.functions is false" in str(e.value)
    with pytest.raises(ValidationError) as e:
        EbpfGoConfig.model_validate({"max_functions": 0})
    assert "max_functions: 0 must be between 1 and 512" in str(e.value)
    cfg = EbpfGoConfig.model_validate({"functions": [{"symbol": "main.f", "min_duration": "1ms",
                                                      "attributes": {"component": "store"}}]})
    from receiver.ebpf_go.probes.functions import PROBE, FunctionSpec
    assert PROBE.options_from(cfg).functions == (FunctionSpec("main.f", 1_000_000, (("component", "store"),), 10_000),)


def test_pin_dirs_of_exited_collectors_are_removed(tmp_path: Path) -> None:
    # A collector killed without a shutdown leaves its pinned maps in bpffs, in kernel memory for
    # good; the next one removes them, and leaves alone those of collectors still running.
    import subprocess
    import sys

    from receiver.ebpf_go.pins import remove_stale_pin_dirs
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    for name in (f"otelgo-{gone}-ebpf_go", f"otelgo-{gone}-ebpf_go_2", f"otelgo-{os.getpid()}-ebpf_go",
                 "otelgo-1-ebpf_go", "otelgo_test_skmsg", "other"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "ctx_spans").write_text("")
    assert remove_stale_pin_dirs(str(tmp_path)) == [f"otelgo-{gone}-ebpf_go", f"otelgo-{gone}-ebpf_go_2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"otelgo-{os.getpid()}-ebpf_go", "otelgo-1-ebpf_go", "otelgo_test_skmsg", "other"])
    assert remove_stale_pin_dirs(str(tmp_path / "missing")) == []
