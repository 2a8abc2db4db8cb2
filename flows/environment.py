"""The environment the ``rlhf`` commands give Prefect, and the temporary API server of one command.

Without ``PREFECT_API_URL``, Prefect starts a temporary API server the first time a flow needs one, after
every import and check, and the command waits for it (7-18 s on 2 cores, more on a loaded machine), having
first imported Prefect's whole server package to do so. ``rlhf`` starts the same server itself, as its
first step, in a subprocess that imports and migrates while this process imports torch, reads the config
and checks the store; the flow then finds ``PREFECT_API_URL`` set and talks to it as to any server. The
server goes when the command ends.
"""

from __future__ import annotations

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
        self.output.close()
        if os.environ.get("PREFECT_API_URL") == self.url:
            del os.environ["PREFECT_API_URL"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
