"""Load, merge, expand and validate the configuration, in the collector's schema and words.

Sources are applied in order (later wins): each `--config` (a path, `file:PATH`, `env:VAR` or
`yaml:a::b: v`), then each `--set a.b=v`. Maps merge deeply, lists and scalars are replaced.
Errors are ConfigError with the path of the bad value and, where one exists, the collector's text.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator, model_validator

from collector import yamlload
from collector.component import ComponentConfig, ComponentID, Factory, Kind
from collector.configtypes import Duration, split_host_port
from collector.errors import ConfigError
from collector.telemetry import LogSampler

log = logging.getLogger("otelgo.config")

SECTIONS = ("receivers", "processors", "exporters", "connectors", "extensions", "service")
SECTION_KIND = {"receivers": Kind.RECEIVER, "processors": Kind.PROCESSOR, "exporters": Kind.EXPORTER,
                "connectors": Kind.CONNECTOR, "extensions": Kind.EXTENSION}
# Old type names users still write, with what they now mean.
DEPRECATED_TYPES = {(Kind.EXPORTER, "logging"): "debug"}
SIGNALS = ("traces", "metrics", "logs")
SUPPORTED_SIGNALS = ("traces",)


# ---------------------------------------------------------------- sources and merging


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yamlload.load(text)
    except yamlload.YAMLProblem as e:
        at = f" at line {e.line}, column {e.column}" if e.line else ""
        raise ConfigError(f"cannot parse {where} as YAML{at}: {e.problem}") from None


def _yaml_uri(spec: str) -> dict[str, Any]:
    """`a::b::c: value` → {"a": {"b": {"c": value}}} (the collector's yaml: provider)."""
    path, sep, value = spec.partition(": ")
    if not sep:
        path, sep, value = spec.partition(":")
        if not sep or path.endswith(":"):
            raise ConfigError(f'invalid yaml: URI "{spec}": expected "key::subkey: value"')
    keys = path.split("::")
    parsed = _parse_yaml(value, f'"yaml:{spec}"') if value.strip() else None
    out: Any = parsed
    for k in reversed(keys):
        out = {k: out}
    return out


def read_source(uri: str) -> dict[str, Any]:
    """One --config value → a mapping (empty when the document is empty)."""
    if uri.startswith("yaml:"):
        return _yaml_uri(uri[5:])
    if uri.startswith("env:"):
        name = uri[4:]
        if name not in os.environ:
            raise ConfigError(f'--config "{uri}": environment variable "{name}" is not set')
        doc = _parse_yaml(os.environ[name], f'environment variable "{name}"')
        where = f'environment variable "{name}"'
    else:
        path = Path(uri[5:] if uri.startswith("file:") else uri)
        if path.is_dir():
            raise ConfigError(f'--config "{uri}": is a directory, give a YAML file')
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f'--config "{uri}": file not found') from None
        except OSError as e:
            raise ConfigError(f'--config "{uri}": cannot read: {e.strerror}') from None
        except UnicodeDecodeError as e:
            raise ConfigError(f'--config "{uri}": not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset '
                              f'{e.start}): save the file as UTF-8') from None
        doc = _parse_yaml(text, f'"{path}"')
        where = f'"{path}"'
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: the top level must be a mapping (receivers:, exporters:, service: ...), "
                          f"not {type(doc).__name__}")
    return doc


def set_flag_to_mapping(flag: str) -> dict[str, Any]:
    """`--set processors.batch.timeout=2s` → nested mapping; the value is parsed as YAML."""
    if "=" not in flag:
        raise ConfigError(f'--set "{flag}": missing equal sign')
    key, _, value = flag.partition("=")
    keys = [k for k in re.split(r"::|\.", key.strip())]
    if not key.strip() or any(not k for k in keys):
        raise ConfigError(f'--set "{flag}": the key must look like section.id.option=value')
    # Component ids may contain '/', never '.', so splitting on '.' is safe.
    out: Any = _parse_yaml(value, f'--set "{flag}"') if value != "" else ""
    for k in reversed(keys):
        out = {k: out}
    return out


def merge(base: Any, over: Any) -> Any:
    """Maps merge deeply; anything else (lists included) is replaced by the later value."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(base[k], v) if k in base else v
        return out
    return over


# ---------------------------------------------------------------- ${env:VAR} expansion

_ENV_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_REF = re.compile(r"\$+\{([^}]*)\}|\$\$")


def _resolve(ref: str, path: str) -> tuple[str, bool]:
    """Return (value, was_set) for the inside of ${...}."""
    scheme, sep, rest = ref.partition(":")
    if not sep:
        scheme, rest = "env", ref
    elif scheme != "env":
        if re.match(r"^[a-zA-Z_][a-zA-Z0-9_]*$", scheme) and rest.startswith("-"):
            raise ConfigError(f'{path}: scheme "{scheme}" is not supported for uri "{ref}" '
                              f'(write ${{env:{scheme}:{rest}}} for a default value)')
        raise ConfigError(f'{path}: scheme "{scheme}" is not supported for uri "{ref}" (use ${{env:NAME}})')
    name, dsep, default = rest.partition(":-")
    if not _ENV_NAME.match(name):
        raise ConfigError(f'{path}: environment variable "{name}" has invalid name: '
                          f'must match regex ^[a-zA-Z_][a-zA-Z0-9_]*$')
    if name in os.environ:
        return os.environ[name], True
    if dsep:
        return default, True
    log.warning(f'Configuration references unset environment variable "{name}" at {path or "the top level"}: '
                f'set it, or write ${{env:{name}:-default}}')
    return "", False


def expand_string(text: str, path: str) -> Any:
    if "$" not in text:
        return text
    whole = re.fullmatch(r"\$\{([^}]*)\}", text)
    if whole:
        value, was_set = _resolve(whole.group(1), path)
        if not was_set:
            return None  # unset without default: the option takes its default
        # A whole-field reference is typed as YAML, so "8080" can fill an int option.
        if value == "":
            return ""
        try:
            parsed = yamlload.load(value)
        except yamlload.YAMLProblem:
            return value
        return parsed if isinstance(parsed, str | int | float | bool) else value

    def repl(m: re.Match[str]) -> str:
        token = m.group(0)
        if token == "$$":
            return "$"
        dollars = len(token) - len(token.lstrip("$"))
        # An even number of '$' before '{' means escaped pairs and a literal "${...}".
        literal = "$" * (dollars // 2)
        if dollars % 2 == 0:
            return literal + token[dollars:]
        return literal + _resolve(m.group(1), path)[0]

    if re.search(r"(?<!\$)\$\{[^}]*$", text):
        raise ConfigError(f'{path}: unterminated "${{" in "{text}": close it with "}}" or write "$$" for a literal $')
    return _REF.sub(repl, text)


def expand(node: Any, path: str = "") -> Any:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            ev = expand(v, f"{path}::{k}" if path else str(k))
            if ev is None and isinstance(v, str):
                continue  # an unset ${env:VAR} leaves the option at its default
            out[k] = ev
        return out
    if isinstance(node, list):
        return [expand(v, f"{path}::{i}") for i, v in enumerate(node)]
    if isinstance(node, str):
        return expand_string(node, path)
    return node


# ---------------------------------------------------------------- service section models


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PipelineConfig(_Strict):
    receivers: list[str] = []
    processors: list[str] = []
    exporters: list[str] = []


class PrometheusPull(_Strict):
    host: str = "localhost"
    port: int = 8888
    without_scope_info: bool = True
    without_units: bool = True
    without_type_suffix: bool = True

    @field_validator("port")
    @classmethod
    def _port(cls, v: int) -> int:
        if not 0 < v <= 65535:
            raise ValueError(f"invalid port {v}: a port is 1-65535")
        return v

    @field_validator("without_scope_info", "without_units", "without_type_suffix")
    @classmethod
    def _names_fixed(cls, v: bool, info: ValidationInfo) -> bool:
        # Our self-metrics have the names of the collector's default reader; other naming is not built.
        if not v:
            raise ValueError(f"{info.field_name}: false is not supported: self-metrics are served with the "
                             "collector's default names (scope info, units and type suffixes left out); remove it")
        return v


class PullExporter(_Strict):
    prometheus: PrometheusPull = PrometheusPull()


class PullReader(_Strict):
    exporter: PullExporter = PullExporter()


class MetricReader(_Strict):
    pull: PullReader | None = None
    periodic: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> MetricReader:
        if self.periodic is not None:
            raise ValueError("periodic (push) readers are not supported yet: use a pull reader with prometheus")
        if self.pull is None:
            raise ValueError("a reader needs pull: {exporter: {prometheus: {host, port}}}")
        return self


class MetricsTelemetry(_Strict):
    level: str = "normal"
    readers: list[MetricReader] | None = None
    address: str | None = None  # legacy form (deprecated upstream, still in most guides)

    @field_validator("level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v not in ("none", "basic", "normal", "detailed"):
            raise ValueError(f'unknown metrics level "{v}": use none, basic, normal or detailed')
        return v

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None:
            split_host_port(v)
        return v

    def endpoint(self) -> tuple[str, int] | None:
        """Where to serve /metrics, or None when metrics are off."""
        if self.level == "none":
            return None
        if self.address is not None:
            host, port = split_host_port(self.address)
            return host or "0.0.0.0", port
        if self.readers:
            pull = self.readers[0].pull
            assert pull is not None
            p = pull.exporter.prometheus
            return p.host, p.port
        return "localhost", 8888


class LogsSampling(_Strict):
    """zap's sampler as the collector sets it up: per tick and message, `initial` lines then every
    `thereafter`-th."""
    enabled: bool = True
    tick: Duration = 10.0
    initial: int = 10
    thereafter: int = 100

    @model_validator(mode="after")
    def _positive(self) -> LogsSampling:
        if self.tick <= 0:
            raise ValueError("tick: must be positive, e.g. 10s")
        if self.initial < 0 or self.thereafter < 0:
            raise ValueError("initial and thereafter must be 0 or more")
        return self


class LogsTelemetry(_Strict):
    level: str = "info"
    encoding: str = "console"
    development: bool = False
    disable_caller: bool = False
    disable_stacktrace: bool = False
    output_paths: list[str] = ["stderr"]
    error_output_paths: list[str] = ["stderr"]
    sampling: LogsSampling = LogsSampling()
    initial_fields: dict[str, Any] = {}

    @field_validator("level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.lower()
        if v not in ("debug", "info", "warn", "error", "dpanic", "panic", "fatal"):
            raise ValueError(f'unknown log level "{v}": use debug, info, warn or error')
        return v

    @field_validator("encoding")
    @classmethod
    def _encoding(cls, v: str) -> str:
        if v not in ("console", "json"):
            raise ValueError(f'unknown log encoding "{v}": use console or json')
        return v

    @field_validator("development")
    @classmethod
    def _development(cls, v: bool) -> bool:
        if v:
            raise ValueError("development: true is not supported (zap's development mode: dpanic logs "
                             "that panic); remove it")
        return v

    @field_validator("output_paths")
    @classmethod
    def _outputs(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("output_paths: give at least one of stderr, stdout or a file path")
        return v

    @field_validator("error_output_paths")
    @classmethod
    def _error_outputs(cls, v: list[str]) -> list[str]:
        # zap writes its own internal errors there; Python's logging writes those to stderr only.
        if v != ["stderr"]:
            raise ValueError("error_output_paths: only [stderr] is supported (logging's own errors go to "
                             "stderr); remove it, and use output_paths for the log itself")
        return v

    def logging_options(self) -> dict[str, Any]:
        """Keyword arguments of telemetry.setup_logging for this section."""
        s = self.sampling
        return {"output_paths": self.output_paths, "caller": not self.disable_caller,
                "stacktrace": not self.disable_stacktrace, "initial_fields": self.initial_fields,
                "sampler": LogSampler(s.tick, s.initial, s.thereafter) if s.enabled else None}


class TelemetryConfig(_Strict):
    logs: LogsTelemetry = LogsTelemetry()
    metrics: MetricsTelemetry = MetricsTelemetry()
    # Attributes of the self-telemetry, served on target_info (null removes a default one).
    resource: dict[str, str | int | float | bool | None] = {}


class ServiceConfig(_Strict):
    extensions: list[str] = []
    pipelines: dict[str, PipelineConfig] = {}
    telemetry: TelemetryConfig = TelemetryConfig()


# ---------------------------------------------------------------- the validated whole


@dataclass
class ComponentSpec:
    id: ComponentID
    kind: Kind
    factory: Factory
    config: ComponentConfig


@dataclass
class PipelineSpec:
    id: str
    signal: str
    receivers: list[ComponentID]
    processors: list[ComponentID]
    exporters: list[ComponentID]


@dataclass
class Config:
    components: dict[tuple[Kind, ComponentID], ComponentSpec]
    pipelines: list[PipelineSpec]
    extensions: list[ComponentID]
    telemetry: TelemetryConfig
    raw: dict[str, Any] = field(default_factory=dict)

    def spec(self, kind: Kind, id: ComponentID) -> ComponentSpec:
        return self.components[(kind, id)]


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model inside `X`, `X | None`, `list[X]` or `dict[str, X]`, if there is exactly one."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    found = {m for a in typing.get_args(annotation) if (m := _model_in(a)) is not None}
    return found.pop() if len(found) == 1 else None


def _keys_at(model: type[BaseModel], parts: list[str]) -> list[str]:
    """The option names valid at `parts` below `model` (list indexes and dict keys are stepped over)."""
    sub: type[BaseModel] | None = model
    container = False  # the last step entered a list or dict: the next part is an index or key
    for part in parts:
        if sub is None:
            return []
        if container:
            container = False
            continue
        fld = sub.model_fields.get(part)
        if fld is None:
            return []
        ann = fld.annotation
        origin = typing.get_origin(ann)
        if origin is typing.Union or origin is types.UnionType:
            inner = [a for a in typing.get_args(ann) if a is not type(None)]
            ann = inner[0] if len(inner) == 1 else ann
            origin = typing.get_origin(ann)
        container = origin in (list, dict, tuple)
        sub = _model_in(ann)
    return list(sub.model_fields) if sub is not None and not container else []


def _format_validation_error(path: str, err: ValidationError, model: type[BaseModel]) -> str:
    """The first problem of a pydantic error as `path::to::key: message`."""
    e = err.errors()[0]
    loc = [str(x) for x in e["loc"]]
    where = "::".join([path] + loc) if loc else path
    etype = e["type"]
    if etype == "extra_forbidden":
        parent = loc[:-1]
        known = _keys_at(model, parent)
        ppath = "::".join([path] + parent)
        hint = _suggest(loc[-1], known)
        return (f"'{ppath}' has invalid keys: {loc[-1]}{hint}"
                + (f"; valid keys are: {', '.join(known)}" if known and not hint else ""))
    msg = e["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    msg = msg[:1].lower() + msg[1:]
    if etype == "missing":
        return f"{where}: required option is missing"
    got = e.get("input")
    if etype.endswith("_type") or etype.endswith("_parsing"):
        return f"{where}: {msg}, got {got!r}"
    return f"{where}: {msg}"


def validate_component(section: str, id_text: str, raw: Any,
                       factories: dict[tuple[Kind, str], Factory]) -> ComponentSpec:
    kind = SECTION_KIND[section]
    path = f"{section}::{id_text}"
    try:
        cid = ComponentID.parse(id_text)
    except ValueError as e:
        raise ConfigError(f"{section}: {e}") from None
    ctype = DEPRECATED_TYPES.get((kind, cid.type), cid.type)
    if ctype != cid.type:
        log.warning(f'the {cid.type} {kind.value} has been deprecated, use the {ctype} {kind.value} instead',
                    extra={"id": str(cid)})
    factory = factories.get((kind, ctype))
    if factory is None:
        valid = sorted({t for (k, t) in factories if k == kind})
        raise ConfigError(f'{section}: unknown type: "{cid.type}" for id: "{cid}" '
                          f'(valid values: [{" ".join(valid)}]){_suggest(cid.type, valid)}')
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of options, got {type(raw).__name__} {raw!r}")
    try:
        cfg = factory.config_model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f'error reading configuration for "{cid}": '
                          f"{_format_validation_error(path, e, factory.config_model)}") from None
    except ValueError as e:
        raise ConfigError(f'error reading configuration for "{cid}": {path}: {e}') from None
    return ComponentSpec(cid, kind, factory, cfg)


def build_config(raw: dict[str, Any], factories: dict[tuple[Kind, str], Factory]) -> Config:
    if not raw or all(not raw.get(s) for s in SECTIONS):
        raise ConfigError("empty configuration file: define receivers, exporters and service::pipelines")
    for top in raw:
        if top not in SECTIONS:
            raise ConfigError(f"'' has invalid keys: {top}{_suggest(str(top), list(SECTIONS))}; "
                              f"top-level keys are {', '.join(SECTIONS)}")
    components: dict[tuple[Kind, ComponentID], ComponentSpec] = {}
    for section in SECTION_KIND:
        body = raw.get(section)
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{section}: expected a mapping of component ids, got {type(body).__name__}")
        for id_text, comp_raw in body.items():
            spec = validate_component(section, str(id_text), comp_raw, factories)
            if (spec.kind, spec.id) in components:
                raise ConfigError(f'{section}: duplicate id "{spec.id}"')
            components[(spec.kind, spec.id)] = spec
    if not any(k == Kind.RECEIVER for k, _ in components):
        raise ConfigError("no receiver configuration specified in config")
    if not any(k == Kind.EXPORTER for k, _ in components):
        raise ConfigError("no exporter configuration specified in config")

    svc_raw = raw.get("service")
    if svc_raw is None:
        svc_raw = {}
    if not isinstance(svc_raw, dict):
        raise ConfigError("service: expected a mapping with pipelines, extensions and telemetry")
    try:
        svc = ServiceConfig.model_validate(svc_raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error("service", e, ServiceConfig)) from None

    if svc.telemetry.metrics.address is not None and svc.telemetry.metrics.readers:
        raise ConfigError("service::telemetry::metrics: set either address (legacy) or readers, not both")

    extensions: list[ComponentID] = []
    for ext in svc.extensions:
        try:
            eid = ComponentID.parse(ext)
        except ValueError as e:
            raise ConfigError(f"service::extensions: {e}") from None
        if (Kind.EXTENSION, eid) not in components:
            raise ConfigError(f'service::extensions: references extension "{ext}" which is not configured')
        extensions.append(eid)

    if not svc.pipelines:
        raise ConfigError("service must have at least one pipeline")
    pipelines: list[PipelineSpec] = []
    for pid, p in svc.pipelines.items():
        where = f"service::pipelines::{pid}"
        try:
            pcid = ComponentID.parse(pid)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        if pcid.type not in SIGNALS:
            raise ConfigError(f'{where}: unknown signal "{pcid.type}": pipeline ids start with traces, '
                              f'metrics or logs (e.g. traces/ebpf){_suggest(pcid.type, list(SIGNALS))}')
        if pcid.type not in SUPPORTED_SIGNALS:
            raise ConfigError(f'{where}: signal "{pcid.type}" is not supported by this collector: only traces')
        if not p.receivers:
            raise ConfigError(f"{where}: must have at least one receiver")
        if not p.exporters:
            raise ConfigError(f"{where}: must have at least one exporter")

        def ids(kind: Kind, names: list[str], where: str = where) -> list[ComponentID]:
            out = []
            for n in names:
                try:
                    cid = ComponentID.parse(n)
                except ValueError as e:
                    raise ConfigError(f"{where}: {e}") from None
                if (kind, cid) not in components:
                    known = [str(c) for k, c in components if k == kind]
                    raise ConfigError(f'{where}: references {kind.value} "{n}" which is not configured'
                                      f'{_suggest(n, known)}')
                if cid in out:
                    raise ConfigError(f'{where}: references {kind.value} "{n}" multiple times')
                out.append(cid)
            return out

        pipelines.append(PipelineSpec(pid, pcid.type, ids(Kind.RECEIVER, p.receivers),
                                      ids(Kind.PROCESSOR, p.processors), ids(Kind.EXPORTER, p.exporters)))
    used = {(Kind.RECEIVER, r) for p in pipelines for r in p.receivers}
    used |= {(Kind.PROCESSOR, r) for p in pipelines for r in p.processors}
    used |= {(Kind.EXPORTER, r) for p in pipelines for r in p.exporters}
    used |= {(Kind.EXTENSION, e) for e in extensions}
    for ckind, cid in components:
        if (ckind, cid) not in used:
            # As in the collector: defined but unused components are not built (not an error).
            log.warning(f'{ckind.value} "{cid}" is configured but not used in any pipeline; it will not run')
    return Config(components, pipelines, extensions, svc.telemetry, raw)


def load(config_uris: list[str], set_flags: list[str],
         factories: dict[tuple[Kind, str], Factory]) -> Config:
    if not config_uris:
        raise ConfigError("at least one config flag must be provided")
    raw: dict[str, Any] = {}
    for uri in config_uris:
        raw = merge(raw, read_source(uri))
    for flag in set_flags:
        raw = merge(raw, set_flag_to_mapping(flag))
    raw = expand(raw)
    return build_config(raw, factories)
