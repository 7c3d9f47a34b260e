"""Connecting to Temporal and preparing a namespace for the platform.

``connect`` opens a client on the configured frontend (the embedded dev server or an
existing cluster). ``ensure_search_attributes`` registers the custom search attributes
the workflows upsert (``builder_engine.config.SEARCH_ATTRIBUTES``) through the operator
service; it is idempotent, so every ``builder-engine up`` can call it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import timedelta

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.client import Client
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.service import RPCError, RPCStatusCode

from builder_engine.config import SEARCH_ATTRIBUTES, Settings

#: Temporal's names of search attribute types (as `--search-attribute` takes them).
INDEXED_VALUE_TYPES: dict[str, IndexedValueType.ValueType] = {
    "Text": IndexedValueType.INDEXED_VALUE_TYPE_TEXT,
    "Keyword": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD,
    "Int": IndexedValueType.INDEXED_VALUE_TYPE_INT,
    "Double": IndexedValueType.INDEXED_VALUE_TYPE_DOUBLE,
    "Bool": IndexedValueType.INDEXED_VALUE_TYPE_BOOL,
    "Datetime": IndexedValueType.INDEXED_VALUE_TYPE_DATETIME,
    "KeywordList": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD_LIST,
}


class SearchAttributeConflict(RuntimeError):
    """A search attribute exists on the namespace with another type than the platform's."""


async def connect(
    settings: Settings, *, within: float = 10.0, runtime: Runtime | None = None
) -> Client:
    """Connect a client to the configured Temporal frontend and namespace.

    ``runtime``: the SDK runtime the client (and workers built on it) use; the process's
    default one when None. Raises ``TimeoutError`` when the frontend does not answer
    within ``within`` seconds and ``RuntimeError`` when the connection is refused.
    """
    return await asyncio.wait_for(
        Client.connect(
            settings.effective_temporal_address,
            namespace=settings.temporal_namespace,
            connect_timeout=timedelta(seconds=within),
            runtime=runtime,
        ),
        within,
    )


#: Latency buckets (ms) for the SDK's task and activity histograms. Its defaults jump from
#: 50 to 100 to 500 ms; a call's database writes take single milliseconds when all is
#: well, and tens to hundreds when the worker falls behind - both need telling apart.
LATENCY_BUCKETS_MS: tuple[float, ...] = (
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000,
)  # fmt: skip
_LATENCY_HISTOGRAMS = (
    "workflow_task_schedule_to_start_latency",
    "workflow_task_execution_latency",
    "workflow_task_replay_latency",
    "activity_schedule_to_start_latency",
    "activity_execution_latency",
    "local_activity_execution_latency",
)


def metrics_runtime(address: str) -> Runtime:
    """An SDK runtime that serves Prometheus metrics on ``address`` (host:port).

    One per process: the SDK binds the port when the runtime is built.
    """
    buckets = {f"temporal_{name}": LATENCY_BUCKETS_MS for name in _LATENCY_HISTOGRAMS}
    prometheus = PrometheusConfig(bind_address=address, histogram_bucket_overrides=buckets)
    return Runtime(telemetry=TelemetryConfig(metrics=prometheus))


async def ensure_search_attributes(
    client: Client,
    namespace: str,
    attributes: Mapping[str, str] = SEARCH_ATTRIBUTES,
) -> list[str]:
    """Register the missing custom search attributes on ``namespace``.

    Returns the names it added (empty when all were there). Raises
    ``SearchAttributeConflict`` when one exists with another type.
    """
    wanted = {name: INDEXED_VALUE_TYPES[kind] for name, kind in attributes.items()}
    listed = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=namespace)
    )
    existing: dict[str, IndexedValueType.ValueType] = {
        **dict(listed.system_attributes),
        **dict(listed.custom_attributes),
    }
    missing: dict[str, IndexedValueType.ValueType] = {}
    for name, kind in wanted.items():
        if name not in existing:
            missing[name] = kind
        elif existing[name] != kind:
            have = IndexedValueType.Name(existing[name])
            raise SearchAttributeConflict(
                f"search attribute {name} exists on namespace {namespace!r} as {have}, "
                f"expected {IndexedValueType.Name(kind)}"
            )
    if not missing:
        return []
    try:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(namespace=namespace, search_attributes=missing)
        )
    except RPCError as err:
        # Another process registered them between our list and add.
        if err.status != RPCStatusCode.ALREADY_EXISTS:
            raise
    return sorted(missing)
