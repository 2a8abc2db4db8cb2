"""Who a lease holder is, and whether it is gone: a process named so that a recycled pid is not it.

A ``ProcessId`` is the hostname, a machine id (the kernel's boot id and the pid namespace: two containers
with one hostname, or a rebooted host, are different machines), the pid and the process's start time (clock
ticks after boot, ``/proc/<pid>/stat`` field 22). A pid that the kernel hands to a new process after the
old one exited has another start time, so ``gone()`` does not mistake the new process for the old one.

Only Linux's ``/proc`` gives these; elsewhere ``machine`` is None and nothing is ever judged gone (a lease
then waits for its expiry, as before). A process on another machine is never judged gone either: only its
lease's expiry tells.
"""

from __future__ import annotations

import os
import signal
import socket
from functools import lru_cache

from pydantic import BaseModel, Field


class ProcessId(BaseModel):
    host: str = Field(description="hostname, for people")
    machine: str | None = Field(description="boot id and pid namespace; None where /proc does not give them")
    pid: int
    started: int | None = Field(description="start time in clock ticks after boot (/proc/<pid>/stat field 22)")

    def here(self) -> bool:
        """Whether this process's pids are ours to look up (same kernel boot, same pid namespace)."""
        return self.machine is not None and self.machine == machine_id()

    def gone(self) -> bool:
        """True only when this machine's /proc says so: no such pid, a pid with another start time (recycled),
        or a zombie (it exited and its parent has not reaped it yet). False when unsure (another machine)."""
        if not self.here():
            return False
        stat = _stat(self.pid)
        return stat is None or stat.started != self.started or stat.state in ("Z", "X")

    def group_gone(self) -> bool:
        """For a process-group leader (a worker started in its own session): True when no live process of
        this machine is in its group any more (the leader may have died before its children)."""
        if not self.here():
            return False
        stat = _stat(self.pid)
        if stat is not None and stat.started != self.started:
            return True  # the pid was reused, and Linux reuses no pid while a group of that id exists
        if stat is not None and stat.state not in ("Z", "X"):
            return False
        for name in os.listdir("/proc"):
            if name.isdigit():
                member = _stat(int(name))
                if member is not None and member.pgrp == self.pid and member.state not in ("Z", "X"):
                    return False
        return True

    def kill(self, sig: int = signal.SIGKILL, group: bool = False) -> bool:
        """Send ``sig`` to this process, or to every process of the group it leads, if it is still there;
        True when sent. A recycled pid is left alone."""
        if group and self.here() and not self.group_gone():
            send = os.killpg
        elif not group and self.here() and not self.gone():
            send = os.kill
        else:
            return False
        try:
            send(self.pid, sig)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"


class _Stat(BaseModel):
    state: str
    pgrp: int
    started: int


def _stat(pid: int) -> _Stat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # "pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime cutime
    # cstime priority nice num_threads itrealvalue starttime ...": comm may hold spaces and parentheses.
    fields = raw[raw.rindex(")") + 2:].split()
    return _Stat(state=fields[0], pgrp=int(fields[2]), started=int(fields[19]))


@lru_cache(maxsize=1)
def machine_id() -> str | None:
    """This kernel boot and pid namespace, or None where /proc does not say (not Linux)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def process_id(pid: int) -> ProcessId | None:
    """The identity of the live process ``pid`` on this machine (None: no such process)."""
    machine = machine_id()
    if machine is None:
        return ProcessId(host=socket.gethostname(), machine=None, pid=pid, started=None)
    stat = _stat(pid)
    if stat is None:
        return None
    return ProcessId(host=socket.gethostname(), machine=machine, pid=pid, started=stat.started)


def this_process() -> ProcessId:
    me = process_id(os.getpid())
    assert me is not None
    return me
