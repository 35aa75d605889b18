"""`resource` processor: the attributes processor's actions applied to resource attributes.

As contrib's resourceprocessor: one `attributes:` list of actions (insert, update, upsert, delete, hash,
extract, convert), run in order on each batch's resources.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from collector.component import ComponentConfig, ComponentID, Consumer, Factory, Kind, Processor
from collector.spans import SpanBatch
from collector.telemetry import ComponentTelemetry
from processors.attributes import ActionConfig, AttrActions, _validate_actions


class Config(ComponentConfig):
    attributes: list[ActionConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> Config:
        if not self.attributes:
            raise ValueError('missing required field "attributes"')
        _validate_actions(self.attributes)
        return self


class ResourceProcessor(Processor):
    mutates_data = True

    def __init__(self, id: ComponentID, telemetry: ComponentTelemetry, next_consumer: Consumer,
                 config: Config) -> None:
        super().__init__(id, telemetry, next_consumer)
        self.actions = AttrActions(config.attributes)

    def consume(self, batch: SpanBatch) -> None:
        for rs in batch.resource_spans:
            self.actions.apply(rs.resource.attributes)
        self.next_consumer.consume(batch)


def _create(id: ComponentID, config: Config, telemetry: ComponentTelemetry,
            next_consumer: Consumer) -> ResourceProcessor:
    return ResourceProcessor(id, telemetry, next_consumer, config)


factory = Factory(
    type="resource", kind=Kind.PROCESSOR, config_model=Config, create=_create, stability="beta",
    description="Applies attribute actions to resource attributes.",
)
