"""The environment the ``rlhf`` commands give Prefect."""

from __future__ import annotations

import os


def prefect_defaults() -> None:
    """No telemetry from a research tool, a temporary API server that may take a while on 2 cores, and no
    third-party progress bars in the log (the stages' own progress lines say it)."""
    from rlhf_core.stages.launch import QUIET

    for name, value in QUIET.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
