"""Children that die with the process that started them: stage workers and Prefect's temporary server.

A SIGKILLed process cannot stop its children: they are re-parented to init and keep running (a worker
keeps training into the store, a temporary API server keeps its port and its database). So the first time
a process adopts a child, it starts a reaper, ``python -m rlhf_core.stages.reaper``, in its own session
(out of reach of a signal sent to the parent's process group), and tells it over a pipe which children to
stop. When the pipe ends (the parent is gone: the kernel closes its end however it died) or the parent's
``ProcessId`` is gone (checked every 2 s, in case a forked child inherited the pipe's end), the reaper sends
SIGTERM to every child it still knows (a worker: its whole process group, torchrun's ranks included), then
SIGKILL to what is left after 5 s, and exits. A child that ends normally is forgotten. Linux only (the
children are named by ``ProcessId``, whose start time keeps a recycled pid safe); elsewhere nothing is sent.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time

from rlhf_core.storage.process import ProcessId, this_process

_POLL = 2.0
_GRACE = 5.0


class Reaper:
    """This process's reaper (one per process; started on the first ``adopt``)."""

    _lock = threading.Lock()
    _mine: "Reaper | None" = None

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.children: dict[int, tuple[ProcessId, bool]] = {}
        self.proc: subprocess.Popen | None = None

    @classmethod
    def get(cls) -> "Reaper":
        with cls._lock:
            if cls._mine is None or cls._mine.pid != os.getpid():  # a forked child gets its own
                cls._mine = Reaper()
            return cls._mine

    def _send(self, message: dict) -> None:
        line = (json.dumps(message) + "\n").encode()
        for _ in range(2):
            if self.proc is None or self.proc.poll() is not None:
                self._start()
                if "forget" in message:
                    return  # a new reaper was told the current children, this one not among them
            try:
                assert self.proc is not None and self.proc.stdin is not None
                self.proc.stdin.write(line)
                self.proc.stdin.flush()
                return
            except (BrokenPipeError, OSError):
                self.proc = None  # the reaper died: start another one and tell it everything again

    def _start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", __name__, this_process().model_dump_json()],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)
        for child, group in self.children.values():
            self.proc.stdin.write((json.dumps({"adopt": child.model_dump(), "group": group}) + "\n").encode())
        self.proc.stdin.flush()

    def adopt(self, child: ProcessId, group: bool = False) -> None:
        """Stop ``child`` (``group``: the process group it leads) when this process is gone."""
        with self._lock:
            self.children[child.pid] = (child, group)
            self._send({"adopt": child.model_dump(), "group": group})

    def forget(self, child: ProcessId) -> None:
        """``child`` ended (or is someone else's now): leave it alone."""
        with self._lock:
            if self.children.pop(child.pid, None) is not None:
                self._send({"forget": child.pid})


def adopt(child: ProcessId, group: bool = False) -> None:
    """Stop ``child`` when this process dies, however it dies (see the module docstring)."""
    Reaper.get().adopt(child, group)


def forget(child: ProcessId) -> None:
    Reaper.get().forget(child)


# ---------------------------------------------------------------------------------------- the reaper


def stop(children: list[tuple[ProcessId, bool]], grace: float = _GRACE) -> None:
    """SIGTERM each child (or its group), then SIGKILL whatever is still there after ``grace`` seconds."""
    for child, group in children:
        child.kill(signal.SIGTERM, group=group)
    deadline = time.monotonic() + grace
    left = children
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [(c, g) for c, g in left if not (c.group_gone() if g else c.gone())]
    for child, group in left:
        child.kill(signal.SIGKILL, group=group)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = ProcessId.model_validate_json(argv[0])
    children: dict[int, tuple[ProcessId, bool]] = {}
    fd, buf = sys.stdin.fileno(), b""
    while True:
        ready, _, _ = select.select([fd], [], [], _POLL)
        if ready:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break  # the parent's end closed: it is gone
            *lines, buf = (buf + chunk).split(b"\n")
            for line in lines:
                msg = json.loads(line)
                if "adopt" in msg:
                    child = ProcessId.model_validate(msg["adopt"])
                    children[child.pid] = (child, bool(msg["group"]))
                else:
                    children.pop(msg["forget"], None)
        elif parent.gone():
            break
    stop(list(children.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
