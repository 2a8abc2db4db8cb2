"""Process identity: a live process is not gone, an exited (or zombie, or recycled) one is, another
machine's never is; a process group is gone only when its last member is."""

import signal
import subprocess
import sys
import time

import pytest

from rlhf_core.storage.process import ProcessId, machine_id, process_id, this_process

pytestmark = pytest.mark.skipif(machine_id() is None, reason="needs Linux /proc")


def _wait_until(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_this_process_is_not_gone_and_an_exited_one_is():
    assert not this_process().gone()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    child = process_id(proc.pid)
    assert child is not None and not child.gone()
    proc.kill()
    assert _wait_until(child.gone)  # a zombie (not reaped yet) already counts as gone
    proc.wait()
    assert child.gone()


def test_a_recycled_pid_is_not_the_process_that_had_it():
    me = this_process()
    assert me.model_copy(update={"started": me.started - 1}).gone()  # same pid, another start time


def test_a_process_on_another_machine_is_never_judged_gone():
    elsewhere = ProcessId(host="other-host", machine="another-boot/pid:[1]", pid=999_999_999, started=1)
    assert not elsewhere.gone() and not elsewhere.group_gone()
    assert not elsewhere.kill(signal.SIGKILL) and not elsewhere.kill(signal.SIGKILL, group=True)
    # Negative control: the same record on this machine is gone (no such pid).
    assert elsewhere.model_copy(update={"machine": machine_id()}).gone()


def test_a_group_outlives_its_leader_until_its_last_member_exits():
    # The leader starts a member in its own session and exits when told: the group is not gone while the
    # member lives.
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; read x"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    member = int(proc.stdout.readline())
    leader = process_id(proc.pid)
    assert not leader.group_gone()
    proc.stdin.close()
    proc.wait()
    assert leader.gone() and not leader.group_gone()
    assert leader.kill(signal.SIGKILL, group=True)  # reaches the member through the group
    assert _wait_until(leader.group_gone)
    assert _wait_until(lambda: process_id(member) is None or process_id(member).gone())
    assert not leader.kill(signal.SIGKILL, group=True)  # nothing left to signal
