"""service::telemetry as a user sets it: log outputs, fields, caller, sampling, and the resource on target_info."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from collector.telemetry import LOG_NAME, LogSampler, setup_logging
from tests.support.collector import CollectorProcess, free_port


def _config(telemetry: dict[str, object]) -> dict[str, object]:
    return {"receivers": {"otlp": {"protocols": {"grpc": {"endpoint": f"127.0.0.1:{free_port()}"}}}},
            "exporters": {"debug": {}},
            "service": {"telemetry": telemetry,
                        "pipelines": {"traces": {"receivers": ["otlp"], "exporters": ["debug"]}}}}


def test_logs_go_to_every_output_path_with_initial_fields_and_no_caller(tmp_path: Path) -> None:
    log_file = tmp_path / "collector.log"
    logs = {"output_paths": ["stdout", str(log_file)], "initial_fields": {"deployment": "eu-1"},
            "disable_caller": True}
    with CollectorProcess(_config({"logs": logs}), tmp_path) as c:
        stdout_lines = [ln for ln in c.log().splitlines() if ln.startswith("20")]
    file_lines = log_file.read_text().splitlines()
    # The same lines reach both outputs (the process log also holds stdout only: nothing on stderr).
    assert [ln.split("\t")[2] for ln in file_lines][:len(stdout_lines)] == [ln.split("\t")[2] for ln in stdout_lines]
    ready = next(ln for ln in file_lines if "Everything is ready" in ln)
    ts, level, message, fields = ready.split("\t")
    assert level == "info" and message == "Everything is ready. Begin running and processing data."
    assert json.loads(fields) == {"deployment": "eu-1"}


def test_caller_shown_by_default_and_json_keys_in_zap_order(tmp_path: Path) -> None:
    with CollectorProcess(_config({"logs": {"encoding": "json"}}), tmp_path) as c:
        ready = next(json.loads(ln) for ln in c.log().splitlines() if "Everything is ready" in ln)
    assert list(ready)[:4] == ["level", "ts", "caller", "msg"]
    path, _, line = ready["caller"].rpartition(":")
    assert path == "collector/service.py" and int(line) > 0


def test_resource_is_served_on_target_info_and_null_removes_a_default(tmp_path: Path) -> None:
    telemetry = {"resource": {"deployment.environment": "staging", "service.instance.id": None,
                              "service.name": "edge-agent"}}
    with CollectorProcess(_config(telemetry), tmp_path) as c:
        info = [ln for ln in c.scrape().splitlines() if ln.startswith("target_info{")]
    assert len(info) == 1
    labels = dict(kv.split("=", 1) for kv in info[0][len("target_info{"):info[0].index("}")].split(","))
    assert labels.pop("service_version").strip('"')
    assert labels == {"deployment_environment": '"staging"', "service_name": '"edge-agent"'}
    assert info[0].endswith(" 1.0")


def test_sampler_keeps_initial_then_every_thereafter_per_message_and_tick(tmp_path: Path) -> None:
    out = tmp_path / "sampled.log"
    setup_logging("info", output_paths=[str(out), str(tmp_path / "second.log")],
                  sampler=LogSampler(tick=3600, initial=2, thereafter=3))
    try:
        log = logging.getLogger(f"{LOG_NAME}.test")
        for i in range(10):
            log.info("same message %d", i)  # one message: the template counts, not the arguments
            if i < 3:
                log.warning("other message")
    finally:
        setup_logging()
    kept = [ln.split("\t")[-1] for ln in out.read_text().splitlines()]
    # 1st, 2nd, then the 5th and 8th (every 3rd after the first 2); the second output counts nothing twice.
    assert kept == ["same message 0", "other message", "same message 1", "other message", "same message 4",
                    "same message 7"]
    assert (tmp_path / "second.log").read_text().count("\n") == 6


def test_a_log_output_that_cannot_be_opened_stops_the_start_in_one_line(tmp_path: Path) -> None:
    import yaml

    from tests.support.collector import run_cli

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_config({"logs": {"output_paths": ["/nonexistent/dir/collector.log"]}})))
    r = run_cli("--config", str(path), timeout=30)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        'Error: service::telemetry::logs::output_paths: cannot open log output "/nonexistent/dir/collector.log": '
        "No such file or directory"]
