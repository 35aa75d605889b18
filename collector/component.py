"""The contracts between the core and the components.

Components meet only through these interfaces: a receiver pushes SpanBatch objects into its
next consumer with a plain synchronous call; processors pass them on; exporters send them out.
"""

from __future__ import annotations

import builtins
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict

from collector.spans import SpanBatch

if TYPE_CHECKING:
    from collector.telemetry import ComponentTelemetry


class Kind(StrEnum):
    RECEIVER = "receiver"
    PROCESSOR = "processor"
    EXPORTER = "exporter"
    CONNECTOR = "connector"
    EXTENSION = "extension"


_TYPE_RE = re.compile(r"^[a-zA-Z][0-9a-zA-Z_]{0,62}$")
_NAME_BAD_RE = re.compile(r"[\s\x00-\x1f\x7f]")


@dataclass(frozen=True, order=True)
class ComponentID:
    """`type[/name]`, as in the collector (component/identifiable.go)."""

    type: str
    name: str = ""

    @staticmethod
    def parse(text: str) -> ComponentID:
        # Errors carry the collector's wording.
        text = str(text)
        if not text.strip():
            raise ValueError("id must not be empty")
        if "/" in text:
            t, _, n = text.partition("/")
            t, n = t.strip(), n.strip()
            if not t:
                raise ValueError(f'in "{text}" id: the part before / should not be empty')
            if not n:
                raise ValueError(f'in "{text}" id: the part after / should not be empty')
        else:
            t, n = text.strip(), ""
        if not _TYPE_RE.match(t):
            raise ValueError(f'invalid character(s) in type "{t}"')
        if n and (len(n) > 1024 or _NAME_BAD_RE.search(n)):
            raise ValueError(f'invalid character(s) in name "{n}"')
        return ComponentID(t, n)

    def __str__(self) -> str:
        return f"{self.type}/{self.name}" if self.name else self.type


class ComponentConfig(BaseModel):
    """Base of every component's config model: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")


class Consumer(Protocol):
    def consume(self, batch: SpanBatch) -> None: ...


class Host(Protocol):
    """What a component may ask of the running service."""

    def get_extension(self, id: ComponentID) -> Any: ...

    def report_fatal_error(self, id: ComponentID, message: str) -> None: ...


class Component(ABC):  # noqa: B024 - every hook is optional
    def __init__(self, id: ComponentID, telemetry: ComponentTelemetry) -> None:
        self.id = id
        self.telemetry = telemetry

    def start(self, host: Host) -> None:  # noqa: B027 - optional hook
        """Start threads and servers. Raise UserError with a clear message to refuse to start."""

    def shutdown(self, timeout: float = 5.0) -> None:  # noqa: B027 - optional hook
        """Stop; for exporters and queueing processors flush what is held, within timeout seconds."""


class Receiver(Component):
    def __init__(self, id: ComponentID, telemetry: ComponentTelemetry, next_consumer: Consumer) -> None:
        super().__init__(id, telemetry)
        self.next_consumer = next_consumer


class Processor(Component):
    # True when consume() changes the batch it is given; the graph then hands it a private copy
    # whenever the same batch also goes to another consumer.
    mutates_data: ClassVar[bool] = False

    def __init__(self, id: ComponentID, telemetry: ComponentTelemetry, next_consumer: Consumer) -> None:
        super().__init__(id, telemetry)
        self.next_consumer = next_consumer

    @abstractmethod
    def consume(self, batch: SpanBatch) -> None: ...


class Exporter(Component):
    mutates_data: ClassVar[bool] = False

    @abstractmethod
    def consume(self, batch: SpanBatch) -> None: ...


class Extension(Component):
    def ready(self) -> None:  # noqa: B027 - optional hook
        """Called when every pipeline has started."""

    def not_ready(self) -> None:  # noqa: B027 - optional hook
        """Called when shutdown begins."""


CreateFn = Callable[..., Component]


@dataclass(frozen=True)
class Command:
    """A subcommand of `otelgo-collector` that a component brings (the ebpf_go receiver's `inspect`
    and `check`): the core lists them from the factories and knows none by name."""

    name: str
    help: str
    add_arguments: Callable[[Any], None]   # (argparse.ArgumentParser) -> None
    run: Callable[[Any], int]              # (argparse.Namespace) -> exit code


@dataclass
class Factory:
    """How the YAML type name becomes a component.

    create(id, config, telemetry, next_consumer) for receivers and processors;
    create(id, config, telemetry) for exporters and extensions.
    """

    type: str
    kind: Kind
    config_model: builtins.type[ComponentConfig]
    create: CreateFn
    stability: str = "development"
    aliases: tuple[str, ...] = ()
    description: str = ""
    # Exporter types a receiver or processor in the same pipeline may expect; unused for now.
    extra: dict[str, Any] = field(default_factory=dict)
    commands: tuple[Command, ...] = ()   # CLI subcommands this component adds
