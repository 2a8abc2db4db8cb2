"""The environment the ``rlhf`` commands give Prefect."""

from __future__ import annotations

import logging
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


class OneLineFailures:
    """A console formatter that leaves out the Python traceback of the given (operational) exceptions:
    for a store that cannot be reached or a worker that exited, Prefect's traceback of the task says nothing
    the message does not (a worker's own output is already in the log above it). Other handlers (the Prefect
    API's, so the UI) still get the whole record."""

    def __init__(self, inner: logging.Formatter | None, quiet: tuple[type[BaseException], ...]):
        self.inner = inner or logging.Formatter()
        self.quiet = quiet

    def format(self, record: logging.LogRecord) -> str:
        if not (record.exc_info and isinstance(record.exc_info[1], self.quiet)):
            return self.inner.format(record)
        saved = record.exc_info, record.exc_text
        record.exc_info, record.exc_text = None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text = saved

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def one_line_operational_failures() -> None:
    """Console output of the ``rlhf`` commands: no traceback for a store that cannot be reached or a stage
    worker that failed (``OneLineFailures``); everything else as Prefect logs it."""
    from rlhf_core.storage.store import StoreUnavailable
    from tasks.runner import StageFailed

    loggers = [logging.getLogger(), *(lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger))]
    for lg in loggers:
        for handler in lg.handlers:
            if type(handler).__name__ == "PrefectConsoleHandler" and not isinstance(handler.formatter, OneLineFailures):
                handler.setFormatter(OneLineFailures(handler.formatter, (StoreUnavailable, StageFailed)))


def stop_at_once_on_interrupt() -> None:
    """Ctrl-C stops ``rlhf run`` at once. Python's KeyboardInterrupt did not: the same Ctrl-C stops Prefect's
    temporary server (it is in the terminal's process group), and Prefect's task threads then retry against
    it for minutes; stage workers, in their own sessions, do not see the Ctrl-C at all. So exit now, with a
    line that says what is kept: this process's reaper stops the workers and the server, and the next run
    takes the stages' leases over at once."""
    import signal
    import sys

    def stop(signum, frame):
        print("\nrlhf: interrupted. Finished stages are kept; run the same command again to resume the others from "
              "their latest checkpoints", file=sys.stderr, flush=True)
        os._exit(130)

    signal.signal(signal.SIGINT, stop)
