"""The environment the ``rlhf`` commands give Prefect."""

from __future__ import annotations

import os


def prefect_defaults() -> None:
    """No telemetry from a research tool, and a temporary API server that may take a while on 2 cores."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
