"""What every stage task shares: the store, the Prefect cache key, and the store-first cache check.

The store is the source of truth. A task first looks for ``<stage>/<key>/manifest.json``; if it is there
the stage is done (even if Prefect's database was wiped) and the task finishes as ``Cached`` without
writing anything. Prefect's own cache sits on top: its key includes the output's content id, so it can
only ever hit for an output that still exists in the store, unchanged.
"""

from __future__ import annotations

from typing import Any, Callable

from prefect import get_run_logger
from prefect.context import FlowRunContext, TaskRunContext
from prefect.states import Completed, State

from rlhf_core.config import PipelineConfig
from rlhf_core.store import Manifest, Store

KeyOf = Callable[[dict[str, Any]], tuple[str, str]]  # task parameters -> (stage, key)


def store_for(cfg: PipelineConfig) -> Store:
    return Store.from_config(cfg.storage)


def cache_key_fn(key_of: KeyOf) -> Callable[[TaskRunContext, dict[str, Any]], str | None]:
    """A Prefect cache key that exists only while the store holds the output: ``stage-key-contentid``.
    Without an output there is no key, so Prefect never serves a result the store no longer has."""

    def fn(_ctx: TaskRunContext, params: dict[str, Any]) -> str | None:
        stage, key = key_of(params)
        cid = store_for(params["cfg"]).manifest_id(stage, key)
        return f"{stage}-{key}-{cid[:16]}" if cid else None

    return fn


def cached(manifest: Manifest, store: Store) -> State:
    """The state a task returns for an output that is already complete in the store."""
    get_run_logger().info("cache hit: %s is complete in the store; nothing to do", store.url_of(manifest.stage, manifest.key))
    return Completed(name="Cached", message=f"complete in {store.url_of(manifest.stage, manifest.key)}", data=manifest)


def producer() -> dict[str, Any]:
    """Lineage recorded in manifests: which flow run and task run produced an output."""
    out: dict[str, Any] = {}
    flow_ctx, task_ctx = FlowRunContext.get(), TaskRunContext.get()
    if flow_ctx and flow_ctx.flow_run:
        out.update(flow_run_id=str(flow_ctx.flow_run.id), flow_run_name=flow_ctx.flow_run.name,
                   flow_name=flow_ctx.flow.name if flow_ctx.flow else None)
    if task_ctx and task_ctx.task_run:
        out.update(task_run_id=str(task_ctx.task_run.id))
    return out
