"""The environment the ``rlhf`` commands give Prefect."""

from __future__ import annotations

import os


def prefect_defaults() -> None:
    """No telemetry from a research tool, and a temporary API server that may take a while on 2 cores."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


def temporary_server_dies_with_this_process() -> None:
    """Without ``PREFECT_API_URL``, Prefect starts a temporary API server at the first API call. Start it now
    instead and give it to this process's reaper (rlhf_core/stages/reaper.py): a SIGKILLed ``rlhf run``
    otherwise leaves it running, with its port and its database."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    from rlhf_core.stages import reaper
    from rlhf_core.storage.process import process_id

    server = SubprocessASGIServer()  # Prefect's own instance: its clients reuse it
    server.start()
    child = process_id(server.server_process.pid) if server.server_process else None
    if child is not None:
        reaper.adopt(child)
