"""Stage leases in the store: exclusive, renewed by a heartbeat, broken safely once expired (file and S3)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from rlhf_core.storage import lease as lease_mod
from rlhf_core.storage.lease import LeaseError, StageLease, lease_path, list_leases, read_record
from rlhf_core.storage.process import machine_id, process_id, this_process
from rlhf_core.storage.store import Store
from tests.conftest import PROJECT


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return Store(str(tmp_path / "store"))
    request.getfixturevalue("s3_server")
    return Store(f"s3://rlhf-test/leases-{time.time_ns()}")


def _lease(store, ttl=5.0, name="a", **kw):
    return StageLease(store, "reward", "k" * 20, ttl=ttl, holder={"flow_run_name": name}, log=lambda m: None, **kw)


def test_acquire_renew_release(store):
    a = _lease(store, ttl=30)
    before = time.time()
    assert a.try_acquire()
    rec = a.read()
    assert rec.owner == a.owner and rec.holder["flow_run_name"] == "a" and rec.holder["pid"]
    assert rec.process == this_process() and rec.workers == []
    # No wall-clock margin: a loaded machine took 2.1 s between acquiring and reading this on moto S3.
    assert before <= rec.acquired_at <= time.time() and rec.expires_at == rec.acquired_at + 30
    time.sleep(0.05)
    assert a.renew()
    assert a.read().expires_at > rec.expires_at and a.read().generation == rec.generation
    a.release()
    assert a.read() is None and list_leases(store) == []


def test_a_held_lease_is_exclusive_and_the_waiter_says_who_holds_it(store):
    a, b = _lease(store, ttl=30, name="run-a"), _lease(store, ttl=30, name="run-b")
    messages = []
    b.log = messages.append
    assert a.try_acquire()
    assert not b.try_acquire()
    with pytest.raises(LeaseError, match="gave up waiting.*run-a"):
        b.acquire(timeout=0.5)
    assert any("waiting for reward/" in m and "run-a" in m and " until " in m for m in messages)
    a.release()
    b.acquire(timeout=5)  # free again: taken at once
    assert b.read().owner == b.owner


def test_an_expired_lease_is_taken_over(store):
    dead = _lease(store, ttl=0.5, name="killed")
    assert dead.try_acquire()  # and never renewed: its holder was killed
    expires_at = dead.read().expires_at
    waiter = _lease(store, ttl=30, name="next", poll_seconds=0.05)
    waiter.acquire(timeout=60)  # about the remaining ttl, not forever (the holder, this process, is alive)
    assert waiter.read().owner == waiter.owner and waiter.read().acquired_at >= expires_at
    # The killed holder, if it comes back, finds it lost and does not delete the new holder's lease.
    assert not dead.renew() and dead.lost.is_set()
    dead.release()
    assert waiter.read().owner == waiter.owner


def test_heartbeat_keeps_a_short_lease_alive(store):
    ttl = 6.0  # a renewal (every ttl/3) may come seconds late on a loaded 2-core machine against moto S3
    with _lease(store, ttl=ttl) as holder:
        first = holder.read()
        other = _lease(store, ttl=ttl, name="other")
        with pytest.raises(LeaseError):
            other.acquire(timeout=ttl + 2)  # without the heartbeat it would have expired
        assert not holder.lost.is_set()
        assert holder.read().generation == first.generation and holder.read().expires_at > first.expires_at
    assert holder.read() is None  # released on exit


def test_a_late_heartbeat_counts_the_lease_as_lost(tmp_path):
    store = Store(str(tmp_path))
    a = _lease(store, ttl=0.6)
    assert a.try_acquire()
    time.sleep(0.55)  # within the last sixth of its life: a breaker may be at work
    assert not a.renew() and a.lost.is_set()
    a.release()
    assert a.read() is not None  # left to expire, never deleted late


def _race(store, n: int, give_up: float = 120) -> list[str]:
    """n waiters at once on an expired lease; returns the owners that believe they hold it. The losers stop
    once someone has won (the winner holds a live lease that none of them may break), so no waiter gives up
    early on a loaded machine and the race needs no wall-clock margin."""
    stale = _lease(store, ttl=0.2, name="stale")
    assert stale.try_acquire()
    time.sleep(0.3)
    start = threading.Barrier(n)
    winners: list[str] = []
    won = threading.Event()

    def contend():
        me = _lease(store, ttl=30, poll_seconds=0.01)
        start.wait()
        deadline = time.monotonic() + give_up
        last_try = False  # after someone won, one more full second of trying: a late second winner shows
        while time.monotonic() < deadline and not last_try:
            last_try = won.is_set()
            try:
                me.acquire(timeout=1.0 if last_try else 0.2)
            except LeaseError:
                continue
            winners.append(me.owner)
            won.set()
            return

    threads = [threading.Thread(target=contend) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return winners


def _slow_remove(monkeypatch):
    """Widen the window between reading the expired lease and deleting it, where a naive breaker races."""
    real = lease_mod._remove

    def slow(store, path):
        time.sleep(0.05)
        real(store, path)

    monkeypatch.setattr(lease_mod, "_remove", slow)


def test_two_breakers_never_both_win(store, monkeypatch):
    _slow_remove(monkeypatch)
    for _ in range(3):
        winners = _race(store, n=6)
        assert len(winners) == 1, winners
        assert Store(store.url).fs.exists(lease_path(store, "reward", "k" * 20))
        store.fs.rm_file(lease_path(store, "reward", "k" * 20))
    # No claim is left behind.
    assert [p for p in store.fs.find(store.root) if p.endswith(".break")] == []


def _break_after_a_stale_read(store, breaker):
    """Two waiters read the same expired lease; the first breaks it and takes it; then the second acts on
    its stale read. Deterministic: the interleaving the threaded race above can only hit by chance."""
    stale = _lease(store, ttl=0.2, name="stale")
    assert stale.try_acquire()
    time.sleep(0.3)
    first, second = _lease(store, ttl=30, name="first"), _lease(store, ttl=30, name="second")
    seen = first.read()
    assert seen.expired() and second.read().generation == seen.generation  # both saw it expired
    assert breaker(first, seen.generation)
    winners = [first.owner]
    if breaker(second, seen.generation):
        winners.append(second.owner)
    return winners


def test_a_breaker_acting_on_a_stale_read_does_not_win(tmp_path):
    store = Store(str(tmp_path))
    winners = _break_after_a_stale_read(store, lambda lease, gen: lease._under_claim(lease.path, gen, lease.try_acquire))
    assert len(winners) == 1
    assert lease_mod.read_record(store, lease_path(store, "reward", "k" * 20)).owner == winners[0]


def test_negative_control_breaking_without_a_claim_lets_two_win(tmp_path):
    """Without the re-read under the claim, the second breaker deletes the first's fresh lease."""
    store = Store(str(tmp_path))

    def naive(lease, generation):
        lease_mod._remove(lease.store, lease.path)  # trusts the expired generation it read earlier
        return lease.try_acquire()

    assert len(_break_after_a_stale_read(store, naive)) == 2


def test_a_claim_left_by_a_killed_breaker_expires_too(tmp_path):
    store = Store(str(tmp_path))
    dead = _lease(store, ttl=0.3)
    assert dead.try_acquire()
    gen = dead.read().generation
    # A breaker claimed it and was killed before deleting the lease.
    breaker = _lease(store, ttl=0.3)
    claim = f"{dead.path}.{gen}.break"
    rec = breaker._record("claim-gen", time.time())
    assert lease_mod._create(store, claim, rec.model_dump_json().encode())
    waiter = _lease(store, ttl=30, poll_seconds=0.05)
    waiter.acquire(timeout=60)
    assert waiter.read().owner == waiter.owner
    assert not store.fs.exists(claim)


def test_a_corrupt_lease_names_the_file_and_the_fix(tmp_path):
    store = Store(str(tmp_path))
    path = lease_path(store, "sft", "k" * 20)
    store.write_bytes_atomic(path, json.dumps({"hello": 1}).encode())
    with pytest.raises(LeaseError, match=r"sft-k+\.json is not a lease record.*delete it"):
        StageLease(store, "sft", "k" * 20, ttl=5, log=lambda m: None).acquire(timeout=1)


def test_a_lease_needs_a_positive_ttl(tmp_path):
    with pytest.raises(ValueError, match="ttl must be > 0"):
        StageLease(Store(str(tmp_path)), "sft", "k" * 20, ttl=0)


# ------------------------------------------------------------------------------ holders that are gone

_HOLD = """
import sys, time
from rlhf_core.storage.lease import StageLease
from rlhf_core.storage.store import Store
lease = StageLease(Store(sys.argv[1]), "reward", "k" * 20, ttl=600, holder={"flow_run_name": "killed"},
                   log=lambda m: None)
assert lease.try_acquire()
print("held", flush=True)
time.sleep(600)
"""


def _held_by_a_killed_process(store) -> "lease_mod.LeaseRecord":
    """A lease of 600 s taken by another process of this machine, which is then SIGKILLed."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, store.url], stdout=subprocess.PIPE, text=True,
                            cwd=PROJECT, env={**os.environ, "PYTHONPATH": str(PROJECT)})
    assert proc.stdout.readline().strip() == "held"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    record = read_record(store, lease_path(store, "reward", "k" * 20))
    assert record.process.pid == proc.pid and record.expires_at > time.time() + 500
    return record


@pytest.mark.skipif(machine_id() is None, reason="needs Linux /proc")
def test_a_lease_whose_holder_died_on_this_machine_is_taken_over_at_once(store):
    dead = _held_by_a_killed_process(store)
    messages = []
    waiter = _lease(store, ttl=30, name="next", poll_seconds=0.05)
    waiter.log = messages.append
    waiter.acquire(timeout=120)  # not the 600 s the killed holder's lease had left
    assert waiter.read().owner == waiter.owner and waiter.read().acquired_at < dead.expires_at
    assert any(f"holder that is gone (pid {dead.process.pid} on" in m for m in messages), messages


@pytest.mark.skipif(machine_id() is None, reason="needs Linux /proc")
def test_negative_control_a_holder_on_another_machine_is_waited_for(store):
    """The same dead holder, recorded as on another machine: nothing here can tell it is gone."""
    dead = _held_by_a_killed_process(store)
    elsewhere = dead.model_copy(update={"process": dead.process.model_copy(update={"machine": "other-boot/pid:[1]"})})
    store.write_bytes_atomic(lease_path(store, "reward", "k" * 20), elsewhere.model_dump_json().encode())
    with pytest.raises(LeaseError, match="gave up waiting.*killed"):
        _lease(store, ttl=30, poll_seconds=0.05).acquire(timeout=1.0)


@pytest.mark.skipif(machine_id() is None, reason="needs Linux /proc")
def test_a_dead_holder_whose_worker_group_lives_is_not_taken_over(tmp_path):
    """A worker orphaned by its killed holder may still write the output: wait until its group is gone."""
    store = Store(str(tmp_path))
    dead = _held_by_a_killed_process(store)
    worker = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        orphaned = dead.model_copy(update={"workers": [process_id(worker.pid)]})
        store.write_bytes_atomic(lease_path(store, "reward", "k" * 20), orphaned.model_dump_json().encode())
        assert dead.holder_gone() and not orphaned.holder_gone() and not orphaned.breakable()
        with pytest.raises(LeaseError, match="gave up waiting"):
            _lease(store, ttl=30, poll_seconds=0.05).acquire(timeout=1.0)
    finally:
        worker.kill()
        worker.wait()
    assert orphaned.holder_gone()
    _lease(store, ttl=30, poll_seconds=0.05).acquire(timeout=120)


def test_a_waiter_says_who_holds_it_and_until_when_every_period(store):
    holder = _lease(store, ttl=30, name="run-a")
    assert holder.try_acquire()
    until = time.strftime("%H:%M:%S", time.localtime(holder.read().expires_at))
    messages = []
    waiter = _lease(store, ttl=30, poll_seconds=0.05, say_every=0.3)
    waiter.log = messages.append
    with pytest.raises(LeaseError):
        waiter.acquire(timeout=4.0)  # ~13 periods: at least two messages on any machine
    said = [m for m in messages if m.startswith("waiting for reward/")]
    assert len(said) >= 2 and all("run-a" in m and f"until {until}" in m for m in said), messages
    assert "waited" in said[-1]
    # Renewed: the next message names the new time.
    holder.renew()
    messages.clear()
    with pytest.raises(LeaseError):
        waiter.acquire(timeout=0.5)
    assert f"until {time.strftime('%H:%M:%S', time.localtime(holder.read().expires_at))}" in messages[0]


def test_release_and_add_worker_never_raise_while_the_store_is_down(tmp_path, monkeypatch):
    """They run while an error is on its way out (release) or right after a worker started (add_worker): an
    outage of the store must neither mask the error nor leave the worker unwatched."""
    store = Store(str(tmp_path))
    a = _lease(store, ttl=30)
    messages = []
    a.log = messages.append
    assert a.try_acquire()

    def down(*args, **kwargs):
        raise ConnectionRefusedError(111, "Connect call failed")

    real = lease_mod.read_record
    monkeypatch.setattr(lease_mod, "read_record", down)
    a.add_worker(this_process())
    assert "could not record worker" in messages[-1] and a.workers == [this_process()]
    monkeypatch.setattr(lease_mod, "read_record", real)
    assert a.renew() and a.read().workers == [this_process()]  # the next heartbeat writes it
    monkeypatch.setattr(lease_mod, "read_record", down)
    a.release()
    assert "could not be released" in messages[-1] and a.generation is None
    monkeypatch.setattr(lease_mod, "read_record", real)
    assert a.read() is not None  # left for the next run: broken once this process is gone, or expired
