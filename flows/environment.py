"""The environment the ``rlhf`` commands give Prefect, and the temporary API server of one command.

Without ``PREFECT_API_URL``, Prefect starts a temporary API server the first time a flow needs one, after
every import and check, and the command waits for it (7-18 s on 2 cores, more on a loaded machine), having
first imported Prefect's whole server package to do so. ``rlhf`` starts the same server itself, as its
first step, in a subprocess that imports and migrates while this process imports torch, reads the config
and checks the store; the flow then finds ``PREFECT_API_URL`` set and talks to it as to any server. The
server goes when the command ends, however it ends: it is given to this process's reaper
(rlhf_core/stages/reaper.py), so that a SIGKILLed ``rlhf run`` leaves no server behind with its port and its
database.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from rlhf_core.trainers.metrics import QUIET_PROGRESS

STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


def prefect_defaults() -> None:
    """No telemetry from a research tool, a temporary API server that may take a while on 2 cores, and no
    third-party progress bars in the log (the stages' own progress lines say it)."""
    for name, value in QUIET_PROGRESS.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault(STARTUP_TIMEOUT_ENV, "90")


class TemporaryServer:
    """Prefect's temporary API server (the command Prefect itself runs: uvicorn on its app factory, UI off),
    started at once and waited for only when a flow is about to run.

        server = TemporaryServer.start_unless_configured()   # None when PREFECT_API_URL is set
        ... imports, config, checks ...
        server.wait()                                        # raises if it did not come up
        ... flows ...
        server.stop()
    """

    def __init__(self, port: int):
        import importlib.util

        spec = importlib.util.find_spec("prefect")  # its folder, without importing it
        app_dir = os.path.dirname(list(spec.submodule_search_locations)[0])
        self.port = port
        self.url = f"http://127.0.0.1:{port}/api"
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        self.t0 = time.perf_counter()
        # Its output goes to a file, not a pipe nobody reads once it is up (a full pipe would block it), and
        # not the terminal (the API's own error traces are not the run's); a failed start shows its end.
        self.output = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", app_dir, "--factory", "prefect.server.api.server:create_app",
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"],
            env=env, stdout=self.output, stderr=subprocess.STDOUT, text=True)
        self.child = _dies_with_this_process(self.proc.pid)
        os.environ["PREFECT_API_URL"] = self.url
        self.ready_s: float | None = None

    @classmethod
    def start_unless_configured(cls) -> "TemporaryServer | None":
        """Start one unless the user points rlhf at a server (``PREFECT_API_URL``)."""
        if os.environ.get("PREFECT_API_URL"):
            return None
        if "prefect.settings" in sys.modules:  # Prefect is configured already (e.g. prefect_test_harness)
            from prefect.settings import PREFECT_API_URL

            if PREFECT_API_URL.value():
                return None
        prefect_defaults()
        return cls(free_port())

    def wait(self) -> None:
        """Block until the server answers its health check.

        Raises:
            RuntimeError: it exited or did not answer within $PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
                with its error output.
        """
        if self.ready_s is not None:
            return
        timeout = float(os.environ.get(STARTUP_TIMEOUT_ENV, "90"))
        while time.perf_counter() - self.t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Prefect's temporary API server exited with code {self.proc.returncode}:\n"
                                   f"{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        self.ready_s = time.perf_counter() - self.t0
                        print(f"rlhf: temporary Prefect API server on {self.url} (up in {self.ready_s:.1f} s; "
                              "set PREFECT_API_URL to use a running server instead)", file=sys.stderr, flush=True)
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.1)
        tail = self.tail()
        self.stop()
        raise RuntimeError(f"Prefect's temporary API server did not answer within {timeout:.0f} s:\n{tail}\n"
                           f"(${STARTUP_TIMEOUT_ENV}); on a loaded machine raise it, or run `prefect server start` "
                           "and set PREFECT_API_URL")

    def tail(self, chars: int = 3000) -> str:
        self.output.flush()
        self.output.seek(0)
        return self.output.read()[-chars:]

    def stop(self) -> None:
        """Send Prefect's queued logs and events first (as prefect_test_harness does), then end the server."""
        if "prefect.logging.handlers" in sys.modules and self.ready_s is not None:
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            for worker in (APILogWorker, EventsWorker):
                try:
                    worker.drain_all(timeout=10)
                except Exception:  # best effort: the run's result does not depend on its last log lines
                    pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.child is not None:
            from rlhf_core.stages import reaper

            reaper.forget(self.child)
        self.output.close()
        if os.environ.get("PREFECT_API_URL") == self.url:
            del os.environ["PREFECT_API_URL"]


def _dies_with_this_process(pid: int):
    """Give the child ``pid`` to this process's reaper, which stops it when this process is gone, however it
    went (SIGKILL, Ctrl-C's immediate exit); returns its ``ProcessId`` (None: it has already exited)."""
    from rlhf_core.stages import reaper
    from rlhf_core.storage.process import process_id

    child = process_id(pid)
    if child is not None:
        reaper.adopt(child)
    return child


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

    def stop(signum, frame):
        print("\nrlhf: interrupted. Finished stages are kept; run the same command again to resume the others from "
              "their latest checkpoints", file=sys.stderr, flush=True)
        os._exit(130)

    signal.signal(signal.SIGINT, stop)
