"""Config loading: merging, --set, ${env:...} expansion, durations, and the exact errors of bad configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from collector import config as configmod
from collector.component import ComponentID, Kind
from collector.configtypes import parse_duration
from collector.errors import ConfigError
from collector.registry import load_factories
from tests.support.collector import run_cli

PIPE = "service: {pipelines: {traces: {receivers: [otlp], exporters: [debug]}}}\n"
BASE = "receivers: {otlp: {}}\nexporters: {debug: {}}\n" + PIPE

# name → (config text, exact error after "Error: invalid configuration: ")
BAD_CONFIGS: dict[str, tuple[str, str]] = {
    "empty file": ("", "empty configuration file: define receivers, exporters and service::pipelines"),
    "comments only": ("# nothing\n", "empty configuration file: define receivers, exporters and service::pipelines"),
    "not YAML": ("receivers: [unclosed\n",
                 "cannot parse \"{path}\" as YAML at line 2, column 1: expected ',' or ']', but got '<stream end>'"),
    "top level is a list": ("- a\n- b\n",
                            "\"{path}\": the top level must be a mapping (receivers:, exporters:, service: ...), not list"),
    "unknown component type": (
        "receivers: {otlpx: {}}\nexporters: {debug: {}}\n"
        "service: {pipelines: {traces: {receivers: [otlpx], exporters: [debug]}}}\n",
        'receivers: unknown type: "otlpx" for id: "otlpx" (valid values: [{receivers}]) (did you mean \'otlp\'?)'),
    "unknown key": ("receivers: {otlp: {protocolz: {}}}\nexporters: {debug: {}}\n" + PIPE,
                    "error reading configuration for \"otlp\": 'receivers::otlp' has invalid keys: protocolz "
                    "(did you mean 'protocols'?)"),
    "unknown top-level key": ("receivers: {otlp: {}}\nexporter: {debug: {}}\n" + PIPE,
                              "'' has invalid keys: exporter (did you mean 'exporters'?); top-level keys are "
                              "receivers, processors, exporters, connectors, extensions, service"),
    "bad duration": (
        "receivers: {otlp: {}}\nprocessors: {batch: {timeout: 5x}}\nexporters: {debug: {}}\n"
        "service: {pipelines: {traces: {receivers: [otlp], processors: [batch], exporters: [debug]}}}\n",
        'error reading configuration for "batch": processors::batch::timeout: invalid duration "5x": '
        "use a number with a unit (ns, us, ms, s, m, h), e.g. 5s"),
    "duration without unit": (
        "receivers: {otlp: {}}\nprocessors: {batch: {timeout: 5}}\nexporters: {debug: {}}\n"
        "service: {pipelines: {traces: {receivers: [otlp], processors: [batch], exporters: [debug]}}}\n",
        'error reading configuration for "batch": processors::batch::timeout: invalid duration 5: '
        "add a unit, e.g. 5s or 5ms"),
    "missing pipeline member": (
        "receivers: {otlp: {}}\nexporters: {debug: {}}\n"
        "service: {pipelines: {traces: {receivers: [otlp], processors: [batch], exporters: [debug]}}}\n",
        'service::pipelines::traces: references processor "batch" which is not configured'),
    "undefined exporter with suggestion": (
        "receivers: {otlp: {}}\nexporters: {debug: {}}\n"
        "service: {pipelines: {traces: {receivers: [otlp], exporters: [debugg]}}}\n",
        'service::pipelines::traces: references exporter "debugg" which is not configured '
        "(did you mean 'debug'?)"),
    "bad env syntax": (
        "receivers: {otlp: {protocols: {grpc: {endpoint: '${FOO:-x}'}}}}\nexporters: {debug: {}}\n" + PIPE,
        'receivers::otlp::protocols::grpc::endpoint: scheme "FOO" is not supported for uri "FOO:-x" '
        "(write ${env:FOO:-x} for a default value)"),
    "unterminated env reference": (
        "receivers: {otlp: {protocols: {grpc: {endpoint: 'x${env:A'}}}}\nexporters: {debug: {}}\n" + PIPE,
        'receivers::otlp::protocols::grpc::endpoint: unterminated "${" in "x${env:A": '
        'close it with "}" or write "$$" for a literal $'),
    "invalid env name": (
        "receivers: {otlp: {protocols: {grpc: {endpoint: '${env:1BAD}'}}}}\nexporters: {debug: {}}\n" + PIPE,
        'receivers::otlp::protocols::grpc::endpoint: environment variable "1BAD" has invalid name: '
        "must match regex ^[a-zA-Z_][a-zA-Z0-9_]*$"),
    "wrong type": (
        "receivers: {otlp: {}}\nprocessors: {batch: {send_batch_size: many}}\nexporters: {debug: {}}\n"
        "service: {pipelines: {traces: {receivers: [otlp], processors: [batch], exporters: [debug]}}}\n",
        'error reading configuration for "batch": processors::batch::send_batch_size: input should be a valid '
        "integer, unable to parse string as an integer, got 'many'"),
    "no pipelines": ("receivers: {otlp: {}}\nexporters: {debug: {}}\n", "service must have at least one pipeline"),
    "pipeline without exporter": (
        "receivers: {otlp: {}}\nexporters: {debug: {}}\nservice: {pipelines: {traces: {receivers: [otlp]}}}\n",
        "service::pipelines::traces: must have at least one exporter"),
    "pipeline without receiver": (
        "receivers: {otlp: {}}\nexporters: {debug: {}}\nservice: {pipelines: {traces: {exporters: [debug]}}}\n",
        "service::pipelines::traces: must have at least one receiver"),
    "no exporters defined": ("receivers: {otlp: {}}\n" + PIPE, "no exporter configuration specified in config"),
    "bad enum": ("receivers: {otlp: {}}\nexporters: {debug: {verbosity: loud}}\n" + PIPE,
                 'error reading configuration for "debug": exporters::debug::verbosity: '
                 "input should be 'basic', 'normal' or 'detailed'"),
    "required option missing": (
        "receivers: {otlp: {}}\nexporters: {file: {}}\n"
        "service: {pipelines: {traces: {receivers: [otlp], exporters: [file]}}}\n",
        'error reading configuration for "file": exporters::file::path: required option is missing'),
    "empty id name": ("receivers: {'otlp/': {}}\nexporters: {debug: {}}\n" + PIPE,
                      'receivers: in "otlp/" id: the part after / should not be empty'),
    "unsupported signal": (
        "receivers: {otlp: {}}\nexporters: {debug: {}}\n"
        "service: {pipelines: {metrics: {receivers: [otlp], exporters: [debug]}}}\n",
        'service::pipelines::metrics: signal "metrics" is not supported by this collector: only traces'),
    "processor twice": (
        "receivers: {otlp: {}}\nprocessors: {batch: {}}\nexporters: {debug: {}}\n"
        "service: {pipelines: {traces: {receivers: [otlp], processors: [batch, batch], exporters: [debug]}}}\n",
        'service::pipelines::traces: references processor "batch" multiple times'),
    "undefined extension": (
        "receivers: {otlp: {}}\nexporters: {debug: {}}\n"
        "service: {extensions: [health_check], pipelines: {traces: {receivers: [otlp], exporters: [debug]}}}\n",
        'service::extensions: references extension "health_check" which is not configured'),
    "bad log level": (
        BASE.replace("service: {", "service: {telemetry: {logs: {level: loud}}, "),
        'service::telemetry::logs::level: unknown log level "loud": use debug, info, warn or error'),
    "endpoint without port": (
        "receivers: {otlp: {protocols: {grpc: {endpoint: localhost}}}}\nexporters: {debug: {}}\n" + PIPE,
        'error reading configuration for "otlp": receivers::otlp::protocols::grpc::endpoint: '
        'endpoint "localhost" has no port: write it as host:port, e.g. localhost:4317'),
    "batch max below size": (
        "receivers: {otlp: {}}\nprocessors: {batch: {send_batch_size: 100, send_batch_max_size: 10}}\n"
        "exporters: {debug: {}}\n"
        "service: {pipelines: {traces: {receivers: [otlp], processors: [batch], exporters: [debug]}}}\n",
        'error reading configuration for "batch": processors::batch: '
        "send_batch_max_size must be greater or equal to send_batch_size"),
    "both metrics address and readers": (
        BASE.replace("service: {", "service: {telemetry: {metrics: {address: 'localhost:1', readers: "
                                   "[{pull: {exporter: {prometheus: {port: 2}}}}]}}, "),
        "service::telemetry::metrics: set either address (legacy) or readers, not both"),
    # What a new user hit (issue 13): each now one line that names the place.
    "duplicate key": (
        "receivers:\n  otlp:\n    protocols: {grpc: {}}\nexporters: {debug: {}}\n"
        "receivers:\n  otlp: {}\n" + PIPE,
        'cannot parse "{path}" as YAML at line 5, column 1: mapping key "receivers" already defined at line 1'),
    "duplicate nested key": (
        "receivers: {otlp: {}}\nexporters:\n  debug:\n    verbosity: basic\n    verbosity: detailed\n" + PIPE,
        'cannot parse "{path}" as YAML at line 5, column 5: mapping key "verbosity" already defined at line 4'),
    "alias bomb": (
        "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\ng: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]\n" + BASE,
        'cannot parse "{path}" as YAML: document contains excessive aliasing (more than 1,000,000 values '
        "once aliases are expanded)"),
    "typo two levels down": (
        "receivers: {otlp: {protocols: {grpc: {endpont: localhost:4317}}}}\nexporters: {debug: {}}\n" + PIPE,
        "error reading configuration for \"otlp\": 'receivers::otlp::protocols::grpc' has invalid keys: endpont "
        "(did you mean 'endpoint'?)"),
    "typo in a list item": (
        "receivers: {ebpf_go: {targets: [{exe_pth: /usr/bin/x}]}}\nexporters: {debug: {}}\n"
        "service: {pipelines: {traces: {receivers: [ebpf_go], exporters: [debug]}}}\n",
        "error reading configuration for \"ebpf_go\": 'receivers::ebpf_go::targets::0' has invalid keys: exe_pth "
        "(did you mean 'exe_path'?)"),
    "typo in the telemetry reader": (
        BASE.replace("service: {", "service: {telemetry: {metrics: {readers: [{pull: {exporter: "
                                   "{prometheus: {prot: 9999}}}}]}}, "),
        "'service::telemetry::metrics::readers::0::pull::exporter::prometheus' has invalid keys: prot "
        "(did you mean 'port'?)"),
    "otlphttp port out of range": (
        "receivers: {otlp: {}}\nexporters: {otlphttp: {endpoint: 'http://localhost:99999'}}\n"
        "service: {pipelines: {traces: {receivers: [otlp], exporters: [otlphttp]}}}\n",
        'error reading configuration for "otlphttp": exporters::otlphttp: invalid port in endpoint '
        '"http://localhost:99999": a port is 0-65535, e.g. http://localhost:4318'),
    "self-metrics port out of range": (
        BASE.replace("service: {", "service: {telemetry: {metrics: {readers: [{pull: {exporter: "
                                   "{prometheus: {port: 99999}}}}]}}, "),
        "service::telemetry::metrics::readers::0::pull::exporter::prometheus::port: invalid port 99999: "
        "a port is 1-65535"),
    "logs development": (
        BASE.replace("service: {", "service: {telemetry: {logs: {development: true}}, "),
        "service::telemetry::logs::development: development: true is not supported (zap's development mode: "
        "dpanic logs that panic); remove it"),
    "logs error_output_paths": (
        BASE.replace("service: {", "service: {telemetry: {logs: {error_output_paths: [/tmp/e.log]}}, "),
        "service::telemetry::logs::error_output_paths: error_output_paths: only [stderr] is supported "
        "(logging's own errors go to stderr); remove it, and use output_paths for the log itself"),
    "prometheus without_units false": (
        BASE.replace("service: {", "service: {telemetry: {metrics: {readers: [{pull: {exporter: "
                                   "{prometheus: {port: 9999, without_units: false}}}}]}}, "),
        "service::telemetry::metrics::readers::0::pull::exporter::prometheus::without_units: without_units: "
        "false is not supported: self-metrics are served with the collector's default names (scope info, "
        "units and type suffixes left out); remove it"),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_config_gives_one_clear_line_and_exit_2(name: str, tmp_path: Path) -> None:
    text, message = BAD_CONFIGS[name]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    r = run_cli("--config", str(path))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "Error: invalid configuration: " + message.replace("{path}", str(path)).replace(
        "{receivers}", " ".join(sorted(t for (k, t) in FACTORIES if k == Kind.RECEIVER)))
    assert "Traceback" not in r.stderr
    # `validate` gives the same answer without starting anything.
    v = run_cli("validate", "--config", str(path))
    assert v.returncode == 2 and v.stderr.strip().splitlines()[-1] == r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("args,message", [
    ((), "at least one config flag must be provided"),
    (("--config", "/nonexistent/x.yaml"), '--config "/nonexistent/x.yaml": file not found'),
    (("--config", "/tmp"), '--config "/tmp": is a directory, give a YAML file'),
    (("--config", "config.yaml", "--set", "processors.batch.timeout"),
     '--set "processors.batch.timeout": missing equal sign'),
])
def test_bad_flags_exit_2(args: tuple[str, ...], message: str) -> None:
    r = run_cli("validate", *args)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "Error: invalid configuration: " + message


def test_valid_default_config_and_version() -> None:
    assert run_cli("validate", "--config", "config.yaml").returncode == 0
    v = run_cli("--version")
    assert v.returncode == 0 and v.stdout.startswith("otelgo-collector version ")


def test_components_lists_types_as_yaml() -> None:
    import yaml

    r = run_cli("components")
    doc = yaml.safe_load(r.stdout)
    assert {c["name"] for c in doc["receivers"]} >= {"otlp", "ebpf_go"}
    assert {c["name"] for c in doc["processors"]} >= {"batch"}
    assert {c["name"] for c in doc["exporters"]} >= {"debug", "file"}
    assert {c["name"] for c in doc["extensions"]} == {"health_check"}


# ---------------------------------------------------------------- in-process units

FACTORIES = load_factories()


def load_text(tmp_path: Path, *texts: str, sets: tuple[str, ...] = ()) -> configmod.Config:
    paths = []
    for i, t in enumerate(texts):
        p = tmp_path / f"c{i}.yaml"
        p.write_text(t)
        paths.append(str(p))
    return configmod.load(paths, list(sets), FACTORIES)


def test_merge_maps_deep_lists_replaced_later_wins(tmp_path: Path) -> None:
    a = ("receivers: {otlp: {protocols: {grpc: {endpoint: 'localhost:1111', max_recv_msg_size_mib: 8}}}}\n"
         "processors: {batch: {timeout: 1s, send_batch_size: 10}}\n"
         "exporters: {debug: {}, 'file/x': {path: /tmp/x}}\n"
         "service: {pipelines: {traces: {receivers: [otlp], processors: [batch], exporters: [debug, file/x]}}}\n")
    b = ("receivers: {otlp: {protocols: {grpc: {endpoint: 'localhost:2222'}}}}\n"
         "processors: {batch: {timeout: 2s}}\n"
         "service: {pipelines: {traces: {exporters: [debug]}}}\n")
    cfg = load_text(tmp_path, a, b, sets=("processors.batch.send_batch_size=99",))
    grpc = cfg.spec(configmod.Kind.RECEIVER, ComponentID("otlp")).config.protocols.grpc  # type: ignore[attr-defined]
    assert grpc.endpoint == "localhost:2222" and grpc.max_recv_msg_size_mib == 8
    batch = cfg.spec(configmod.Kind.PROCESSOR, ComponentID("batch")).config
    assert batch.timeout == 2.0 and batch.send_batch_size == 99  # type: ignore[attr-defined]
    assert [str(x) for x in cfg.pipelines[0].exporters] == ["debug"]  # list replaced, not appended
    assert [str(x) for x in cfg.pipelines[0].receivers] == ["otlp"]


def test_env_expansion_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTLP_PORT", "4999")
    monkeypatch.setenv("HOSTNAME_X", "h")
    monkeypatch.setenv("BATCH", "123")
    monkeypatch.delenv("UNSET_X", raising=False)
    text = ("receivers: {otlp: {protocols: {grpc: {endpoint: '${HOSTNAME_X}:${env:OTLP_PORT}'}}}}\n"
            "processors: {batch: {send_batch_size: '${env:BATCH}', timeout: '${env:UNSET_X:-3s}'}}\n"
            "exporters: {file: {path: '/tmp/$${not_expanded}-${env:UNSET_X:-d}'}}\n"
            "service: {pipelines: {traces: {receivers: [otlp], processors: [batch], exporters: [file]}}}\n")
    cfg = load_text(tmp_path, text)
    grpc = cfg.spec(configmod.Kind.RECEIVER, ComponentID("otlp")).config.protocols.grpc  # type: ignore[attr-defined]
    assert grpc.endpoint == "h:4999"
    batch = cfg.spec(configmod.Kind.PROCESSOR, ComponentID("batch")).config
    assert batch.send_batch_size == 123 and batch.timeout == 3.0  # type: ignore[attr-defined]
    assert cfg.spec(configmod.Kind.EXPORTER, ComponentID("file")).config.path == "/tmp/${not_expanded}-d"  # type: ignore[attr-defined]


def test_unset_env_without_default_leaves_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UNSET_Y", raising=False)
    cfg = load_text(tmp_path, "receivers: {otlp: {}}\nprocessors: {batch: {timeout: '${env:UNSET_Y}'}}\n"
                    "exporters: {debug: {}}\nservice: {pipelines: {traces: {receivers: [otlp], "
                    "processors: [batch], exporters: [debug]}}}\n")
    assert cfg.spec(configmod.Kind.PROCESSOR, ComponentID("batch")).config.timeout == 0.2  # type: ignore[attr-defined]


def test_yaml_and_env_uris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WHOLE_CONFIG", BASE)
    cfg = configmod.load(["env:WHOLE_CONFIG", "yaml:exporters::debug::verbosity: detailed"], [], FACTORIES)
    assert cfg.spec(configmod.Kind.EXPORTER, ComponentID("debug")).config.verbosity == "detailed"  # type: ignore[attr-defined]


def test_logging_exporter_is_accepted_as_debug(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "receivers: {otlp: {}}\nexporters: {logging: {verbosity: normal}}\n"
                    "service: {pipelines: {traces: {receivers: [otlp], exporters: [logging]}}}\n")
    spec = cfg.spec(configmod.Kind.EXPORTER, ComponentID("logging"))
    assert spec.factory.type == "debug" and spec.config.verbosity == "normal"  # type: ignore[attr-defined]


@pytest.mark.parametrize("text,seconds", [("5s", 5.0), ("200ms", 0.2), ("1m30s", 90.0), ("1.5h", 5400.0),
                                          ("10us", 1e-5), ("0", 0.0), (0, 0.0), ("250ns", 2.5e-7)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["5", "s", "5 s", "5sec", "", True, 1.5, "1h-3m"])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_component_ids() -> None:
    assert ComponentID.parse(" otlp / a ") == ComponentID("otlp", "a")
    for bad, msg in [("", "id must not be empty"), ("/x", 'in "/x" id: the part before / should not be empty'),
                     ("1abc", 'invalid character(s) in type "1abc"')]:
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            ComponentID.parse(bad)


def test_config_error_is_user_error() -> None:
    with pytest.raises(ConfigError):
        configmod.load([], [], FACTORIES)


def test_non_utf8_config_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(BASE.encode() + "# caf\u00e9\n".encode("latin-1"))
    r = run_cli("validate", "--config", str(path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    offset = len(BASE) + len("# caf")
    assert r.stderr.strip().splitlines() == [
        f'Error: invalid configuration: --config "{path}": not UTF-8 text (byte 0xe9 at offset {offset}): '
        "save the file as UTF-8"]


def test_yaml_12_booleans_only_so_off_and_yes_stay_words(tmp_path: Path) -> None:
    """`propagation: off` is documented unquoted; YAML 1.1 (PyYAML's default) reads it as false."""
    cfg = load_text(tmp_path, "receivers: {ebpf_go: {propagation: off}}\nexporters: {debug: {}}\n"
                    "service: {pipelines: {traces: {receivers: [ebpf_go], exporters: [debug]}}}\n")
    spec = cfg.spec(Kind.RECEIVER, ComponentID.parse("ebpf_go"))
    assert spec.config.propagation == "off"  # type: ignore[attr-defined]
    from collector import yamlload

    assert yamlload.load("a: [on, off, yes, no, y, n, true, false, True, FALSE]") == {
        "a": ["on", "off", "yes", "no", "y", "n", True, False, True, False]}
    # Merge keys still merge: `<<` may repeat keys on purpose.
    assert yamlload.load("b: &b {x: 1, y: 2}\nc: {<<: *b, y: 3}") == {"b": {"x": 1, "y": 2}, "c": {"x": 1, "y": 3}}


def test_unset_variable_warning_names_the_variable_and_the_option(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(BASE.replace("otlp: {}", "otlp: {protocols: {grpc: {endpoint: '${env:OTLP_LISTEN}'}}}"))
    r = run_cli("validate", "--config", str(path))
    assert r.returncode == 0, r.stderr
    warning = [ln for ln in r.stderr.splitlines() if "\twarn\t" in ln]
    assert len(warning) == 1
    assert warning[0].split("\t")[3] == ('Configuration references unset environment variable "OTLP_LISTEN" at '
                                         "receivers::otlp::protocols::grpc::endpoint: set it, or write "
                                         "${env:OTLP_LISTEN:-default}")
