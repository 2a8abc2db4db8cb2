"""Stage leases in the store: exclusive, renewed by a heartbeat, broken safely once expired (file and S3)."""

import json
import threading
import time

import pytest

from rlhf_core.storage import lease as lease_mod
from rlhf_core.storage.lease import LeaseError, StageLease, lease_path, list_leases
from rlhf_core.storage.store import Store


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
    assert a.try_acquire()
    rec = a.read()
    assert rec.owner == a.owner and rec.holder["flow_run_name"] == "a" and rec.holder["pid"]
    assert 29 < rec.expires_at - time.time() <= 30
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
    assert any("waiting for reward/" in m and "run-a" in m and "expires in" in m for m in messages)
    a.release()
    b.acquire(timeout=5)  # free again: taken at once
    assert b.read().owner == b.owner


def test_an_expired_lease_is_taken_over(store):
    dead = _lease(store, ttl=0.5, name="killed")
    assert dead.try_acquire()  # and never renewed: its holder was killed
    waiter = _lease(store, ttl=30, name="next", poll_seconds=0.05)
    t0 = time.monotonic()
    waiter.acquire(timeout=10)
    assert time.monotonic() - t0 < 3  # about the remaining ttl, not forever
    assert waiter.read().owner == waiter.owner
    # The killed holder, if it comes back, finds it lost and does not delete the new holder's lease.
    assert not dead.renew() and dead.lost.is_set()
    dead.release()
    assert waiter.read().owner == waiter.owner


def test_heartbeat_keeps_a_short_lease_alive(store):
    ttl = 2.0  # renewals every ttl/3 may be a second late on a loaded 2-core CI machine against moto S3
    with _lease(store, ttl=ttl) as holder:
        other = _lease(store, ttl=ttl, name="other")
        with pytest.raises(LeaseError):
            other.acquire(timeout=2 * ttl)  # two ttls: without the heartbeat it would have expired
        assert not holder.lost.is_set()
    assert holder.read() is None  # released on exit


def test_a_late_heartbeat_counts_the_lease_as_lost(tmp_path):
    store = Store(str(tmp_path))
    a = _lease(store, ttl=0.6)
    assert a.try_acquire()
    time.sleep(0.55)  # within the last sixth of its life: a breaker may be at work
    assert not a.renew() and a.lost.is_set()
    a.release()
    assert a.read() is not None  # left to expire, never deleted late


def _race(store, n: int, hold: float = 0.8) -> list[str]:
    """n waiters at once on an expired lease; returns the owners that believe they hold it."""
    stale = _lease(store, ttl=0.2, name="stale")
    assert stale.try_acquire()
    time.sleep(0.3)
    start = threading.Barrier(n)
    winners: list[str] = []

    def contend():
        me = _lease(store, ttl=30, poll_seconds=0.01)
        start.wait()
        try:
            me.acquire(timeout=hold)
            winners.append(me.owner)
        except LeaseError:
            pass

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
    waiter.acquire(timeout=5)
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
