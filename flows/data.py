from __future__ import annotations

from prefect import flow

from flows.params import RunParams
from rlhf_core.store import Manifest
from tasks.data import prepare_data


@flow(name="rlhf-data", flow_run_name=lambda: _run_name("data"))
def data_flow(params: RunParams = RunParams()) -> Manifest:
    """Step 0: unify, blend and split the profile's data sources into Arrow datasets in the store."""
    return prepare_data.submit(params.config()).result()


def _run_name(stage: str) -> str:
    from prefect.runtime import flow_run

    params = RunParams.model_validate(flow_run.parameters.get("params") or {})
    return f"{stage}: {params.run_name()}"
