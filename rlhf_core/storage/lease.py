"""Stage leases in the store: one run at a time produces a given output, and a killed holder blocks the
others for at most one lease period, or not at all on its own machine (DESIGN.md: "Cache keys and
resume"; Prefect's file lock has no expiry).

A lease is a small JSON object at ``<root>/_leases/<stage>-<key>.json``::

    {stage, key, owner, generation, holder: {host, pid, flow_run_id, ...}, upstream: {stage: key},
     process: ProcessId, workers: [ProcessId], acquired_at, expires_at}
                                                                (times: epoch seconds, the holder's clock)

- Acquire: create the object atomically (S3: a conditional put, ``If-None-Match: *``; a local disk: a
  hard link of a complete temporary file), so of several runs exactly one creates it.
- Renew: the holder rewrites ``expires_at`` from a heartbeat thread every ttl/3, after checking that the
  lease is still its own and not within the last sixth of its life (a lease that old may be being broken;
  the holder then counts it as lost instead of racing the breaker).
- Wait: the others poll (every ttl/10, at most 5 s), logging who holds it and until when, once a minute.
- Break: a lease is broken when its ``expires_at`` has passed, or at once when its holder is gone: the
  holding process (``process``: host, pid and start time; rlhf_core/storage/process.py) is no longer alive
  on this very machine, and neither is any process of the worker groups it launched (``workers``, added
  while it holds the lease), so nobody can still be writing the output. A dead process cannot renew, so a
  lease found breakable stays breakable until it is deleted. A process on another machine is judged by the
  expiry alone. Breaking is safe: the waiter first creates the claim ``<lease>.<generation>.break``
  atomically; only the claim's winner re-reads the lease, deletes it if it is still that breakable
  generation, creates its own and removes the claim. Two waiters can never both break it and both hold it.
  A claim is itself a record with an expiry and a process, so a breaker killed while holding one is
  cleared the same way (a claim on the claim).

Hosts sharing a store need clocks that agree to well within a sixth of ``storage.lease_seconds`` (NTP).
"""

from __future__ import annotations

import os
import posixpath
import socket
import tempfile
import threading
import time
import uuid
from typing import Any, Callable

from pydantic import BaseModel, Field, ValidationError

from rlhf_core.storage.process import ProcessId, this_process
from rlhf_core.storage.store import Store

LEASES = "_leases"
_SAFETY = 1 / 6  # a holder never rewrites or deletes a lease in its last sixth of life
_MAX_CLAIM_DEPTH = 3


class LeaseError(RuntimeError):
    """A lease object that cannot be read, or a wait that ran past its timeout."""


class LeaseRecord(BaseModel):
    stage: str
    key: str
    owner: str = Field(description="uuid of the StageLease object (one attempt of one task)")
    generation: str = Field(description="uuid of this acquisition; renewals keep it, a new holder changes it")
    holder: dict[str, Any] = Field(default_factory=dict, description="host, pid, flow run: for people")
    upstream: dict[str, str] = Field(default_factory=dict, description="stage -> key the holder reads")
    process: ProcessId | None = Field(default=None, description="the process that holds and renews it")
    workers: list[ProcessId] = Field(default_factory=list, description="leaders of the worker process groups "
                                     "the holder launched (each in its own session)")
    acquired_at: float
    expires_at: float

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at <= (time.time() if now is None else now)

    def holder_gone(self) -> bool:
        """The holding process and every worker group it launched are gone from this machine (False for a
        holder on another machine, or a record without a process)."""
        return (self.process is not None and self.process.gone()
                and all(w.group_gone() for w in self.workers))

    def breakable(self) -> bool:
        return self.expired() or self.holder_gone()

    def describe(self) -> str:
        """Who holds it and until when, for the people waiting."""
        h = self.holder
        where = ", ".join(x for x in (f"flow run {h['flow_run_id']}" if h.get("flow_run_id") else "",
                                      f"pid {h['pid']} on {h.get('host')}" if h.get("pid") else "") if x)
        who = (f"run {h['flow_run_name']!r}" if h.get("flow_run_name") else "a run") + (f" ({where})" if where else "")
        left = self.expires_at - time.time()
        until = time.strftime("%H:%M:%S", time.localtime(self.expires_at))
        if left <= 0:
            return f"held by {who}; expired {-left:.0f}s ago"
        return f"held by {who} until {until} unless renewed (in {left:.0f}s)"


def lease_path(store: Store, stage: str, key: str) -> str:
    return store.path(LEASES, f"{stage}-{key}.json")


def read_record(store: Store, path: str) -> LeaseRecord | None:
    """The record at ``path``, or None when there is none."""
    try:
        raw = store.fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        return LeaseRecord.model_validate_json(raw)
    except ValidationError as e:
        raise LeaseError(
            f"{store.scheme}://{path} is not a lease record ({e.error_count()} errors); it was edited or written "
            "by something else: delete it (no run holds it)"
        ) from None


def list_leases(store: Store) -> list[LeaseRecord]:
    """Every stage lease in the store (expired ones included); claims and temporary files are skipped."""
    try:
        names = [posixpath.basename(p) for p in store.fs.ls(store.path(LEASES), detail=False)]
    except FileNotFoundError:
        return []
    out = []
    for name in sorted(names):
        if name.endswith(".json") and not name.startswith("."):
            rec = read_record(store, store.path(LEASES, name))
            if rec is not None:
                out.append(rec)
    return out


def _create(store: Store, path: str, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists; True when this call created it. Atomic."""
    if store.scheme == "file":
        # fsspec's local pipe_file(mode="create") checks, then writes: not atomic. A hard link is, and the
        # object appears complete.
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    try:
        store.fs.pipe_file(path, data, mode="create")  # S3: put_object with If-None-Match: *
        return True
    except FileExistsError:
        return False


def _remove(store: Store, path: str) -> None:
    try:
        store.fs.rm_file(path)
    except FileNotFoundError:
        pass


class StageLease:
    """The lease on one stage output. Use as a context manager: waits, holds with a heartbeat, releases.

    Args:
        store: the store holding the output.
        stage, key: the output.
        ttl: seconds a lease stays valid without a heartbeat (``storage.lease_seconds``).
        holder: who holds it, for the people and runs that wait (host and pid are added).
        upstream: stage -> key of the outputs the holder reads (``rlhf store gc`` keeps them).
        poll_seconds: how often a waiter looks again (default ttl/10, between 0.2 and 5 s).
        say_every: how often a waiter logs who holds the lease and until when (and whenever it changes).
        log: where waiting and lost-lease messages go.
    """

    def __init__(self, store: Store, stage: str, key: str, ttl: float, holder: dict[str, Any] | None = None,
                 upstream: dict[str, str] | None = None, poll_seconds: float | None = None,
                 say_every: float = 60.0, log: Callable[[str], None] = print):
        if ttl <= 0:
            raise ValueError(f"lease ttl must be > 0, got {ttl}")
        self.store, self.stage, self.key, self.ttl = store, stage, key, float(ttl)
        self.path = lease_path(store, stage, key)
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), **(holder or {})}
        self.upstream = dict(upstream or {})
        self.poll = poll_seconds if poll_seconds is not None else min(5.0, max(0.2, self.ttl / 10))
        self.say_every = say_every
        self.log = log
        self.process = this_process()
        self.workers: list[ProcessId] = []
        self.owner = uuid.uuid4().hex
        self.generation: str | None = None
        self.took_over: LeaseRecord | None = None  # the record this lease replaced, when it broke one
        self.lost = threading.Event()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"{self.store.scheme}://{self.path}"

    def _record(self, generation: str, now: float) -> LeaseRecord:
        return LeaseRecord(stage=self.stage, key=self.key, owner=self.owner, generation=generation,
                           holder=self.holder, upstream=self.upstream, process=self.process,
                           workers=self.workers, acquired_at=now, expires_at=now + self.ttl)

    def read(self) -> LeaseRecord | None:
        return read_record(self.store, self.path)

    # ------------------------------------------------------------------------------------------- acquire
    def try_acquire(self) -> bool:
        """Take the lease if nobody holds it (an expired one counts as held: see ``acquire``)."""
        generation = uuid.uuid4().hex
        if _create(self.store, self.path, self._record(generation, time.time()).model_dump_json().encode()):
            self.generation = generation
            self.lost.clear()
            return True
        return False

    def acquire(self, timeout: float | None = None) -> None:
        """Wait until this lease is ours: poll, and break the lease once it has expired or its holder is
        gone from this machine. Logs who holds it and until when, then again every ``say_every`` seconds.

        Raises:
            LeaseError: ``timeout`` seconds passed while a live holder kept renewing.
        """
        t0 = time.monotonic()
        deadline = None if timeout is None else t0 + timeout
        announced: str | None = None
        last_log = 0.0
        while True:
            if self.try_acquire():
                if announced:
                    self.log(f"lease {self.url} acquired after waiting {time.monotonic() - t0:.0f}s")
                return
            current = self.read()
            if current is None:
                continue  # released between our create and our read: try again now
            if current.breakable():
                why = "expired" if current.expired() else f"gone ({current.process.describe()} exited)"
                if self._under_claim(self.path, current.generation, self.try_acquire):
                    self.took_over = current
                    self.log(f"lease {self.url}: took over from a holder that is {why} ({current.describe()})")
                    return
            elif current.generation != announced or time.monotonic() - last_log >= self.say_every:
                waited = f" (waited {time.monotonic() - t0:.0f}s)" if announced else ""
                self.log(f"waiting for {self.stage}/{self.key}: {current.describe()}{waited}")
                announced, last_log = current.generation, time.monotonic()
            pause = min(self.poll, max(0.05, current.expires_at - time.time() + 0.05))
            if deadline is not None:
                if time.monotonic() >= deadline:
                    raise LeaseError(f"gave up waiting {timeout:.1f}s for {self.url}: {current.describe()}")
                pause = min(pause, max(0.0, deadline - time.monotonic()))
            time.sleep(pause)

    def _under_claim(self, path: str, generation: str, then: Callable[[], bool], depth: int = 0) -> bool:
        """Delete the record at ``path`` if it is still the expired ``generation``, then run ``then``; all
        under the claim ``<path>.<generation>.break``, which at most one caller holds at a time."""
        claim = f"{path}.{generation}.break"
        now = time.time()
        record = LeaseRecord(stage=self.stage, key=self.key, owner=self.owner, generation=uuid.uuid4().hex,
                             holder=self.holder, process=self.process, acquired_at=now, expires_at=now + self.ttl)
        if not _create(self.store, claim, record.model_dump_json().encode()):
            other = read_record(self.store, claim)
            if other is not None and other.breakable() and depth < _MAX_CLAIM_DEPTH:
                # A breaker was killed while holding the claim: clear it (same protocol), retry next poll.
                self._under_claim(claim, other.generation, lambda: True, depth + 1)
            return False
        try:
            current = read_record(self.store, path)
            if current is not None:
                if current.generation != generation or not current.breakable():
                    return False  # someone else broke it and holds a new one, or the holder renewed in time
                _remove(self.store, path)
            return then()
        finally:
            _remove(self.store, claim)

    # ------------------------------------------------------------------------------------ renew, release
    def renew(self) -> bool:
        """Push ``expires_at`` one ttl ahead if the lease is still ours; otherwise mark it lost."""
        with self._lock:
            if self.generation is None or self.lost.is_set():
                return False
            current = self.read()
            now = time.time()
            if current is None or current.generation != self.generation or current.expires_at - now < self.ttl * _SAFETY:
                self.lost.set()
                self.log(f"lost lease {self.url}: " + ("it is gone" if current is None else
                         "another run holds it" if current.generation != self.generation else "heartbeat came too late"))
                return False
            renewed = current.model_copy(update={"expires_at": now + self.ttl, "workers": list(self.workers)})
            self.store.write_bytes_atomic(self.path, renewed.model_dump_json().encode())
            return True

    def add_worker(self, leader: ProcessId) -> None:
        """Record a worker process group the holder launched: until it is gone too, the holder does not count
        as gone (a worker orphaned by a killed holder may still be writing). Renews the lease with it."""
        with self._lock:
            self.workers.append(leader)
        try:
            self.renew()
        except Exception as e:  # a store hiccup: the next heartbeat writes it
            self.log(f"lease {self.url}: could not record worker {leader.describe()} yet ({type(e).__name__}: {e})")

    def release(self) -> None:
        """Delete the lease if it is still ours and safely alive (else it simply expires). Never raises: it
        runs while an error may be on its way out, and a lease the store cannot take back now is broken at
        once when this process is gone (or when it expires)."""
        self._stop_heartbeat()
        with self._lock:
            if self.generation is None:
                return
            try:
                current = self.read()
                if (current is not None and current.generation == self.generation
                        and current.expires_at - time.time() >= self.ttl * _SAFETY):
                    _remove(self.store, self.path)
            except Exception as e:
                self.log(f"lease {self.url} could not be released ({type(e).__name__}: {e}); the next run takes "
                         "it over once this process has exited")
            finally:
                self.generation = None
                self.workers = []

    # ---------------------------------------------------------------------------------------- heartbeat
    def start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.stage}-{self.key[:8]}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self.renew():
                    return
            except Exception as e:  # a store hiccup: try again next beat, the lease has 2/3 of its life left
                self.log(f"lease {self.url}: renewal failed ({e}); retrying")

    def _stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def __enter__(self) -> "StageLease":
        self.acquire()
        self.start_heartbeat()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
