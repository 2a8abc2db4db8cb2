"""Children that die with their parent: a SIGKILLed parent's adopted children (and their process groups)
are stopped by its reaper; a forgotten child, or one never adopted, is left alone."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rlhf_core.storage.process import ProcessId, machine_id
from tests.conftest import PROJECT

pytestmark = pytest.mark.skipif(machine_id() is None, reason="needs Linux /proc")

# A parent that starts two children (each in its own session, so that a signal to the parent's group
# misses them), adopts or forgets them as told, reports them, and waits to be killed.
_PARENT = """
import json, subprocess, sys, time
from rlhf_core.stages import reaper
from rlhf_core.storage.process import process_id
mode = sys.argv[1]
kids = [subprocess.Popen(["sleep", "600"], start_new_session=True) for _ in range(2)]
ids = [process_id(k.pid) for k in kids]
if mode != "none":
    reaper.adopt(ids[0], group=True)
    reaper.adopt(ids[1])
if mode == "forget":
    reaper.forget(ids[1])
print(json.dumps([i.model_dump() for i in ids]), flush=True)
time.sleep(600)
"""


def _kill_parent(mode: str) -> list[ProcessId]:
    proc = subprocess.Popen([sys.executable, "-c", _PARENT, mode], stdout=subprocess.PIPE, text=True, cwd=PROJECT,
                            env={**os.environ, "PYTHONPATH": str(PROJECT)})
    kids = [ProcessId.model_validate(k) for k in json.loads(proc.stdout.readline())]
    assert not any(k.gone() for k in kids)
    proc.send_signal(signal.SIGKILL)  # no cleanup, no atexit: only the reaper can act
    proc.wait()
    return kids


def _gone_within(kid: ProcessId, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if kid.gone():
            return True
        time.sleep(0.05)
    return False


def test_adopted_children_die_with_a_sigkilled_parent_and_forgotten_ones_do_not():
    group, plain = _kill_parent("adopt")
    assert _gone_within(group, 60) and _gone_within(plain, 60)
    assert group.group_gone()
    kept, forgotten = _kill_parent("forget")
    try:
        assert _gone_within(kept, 60)
        assert not _gone_within(forgotten, 3)  # the reaper has already acted on `kept`
    finally:
        forgotten.kill()


def test_negative_control_children_outlive_a_sigkilled_parent_without_a_reaper():
    kids = _kill_parent("none")
    try:
        assert not any(_gone_within(k, 3) for k in kids)  # orphaned: re-parented, still running
    finally:
        for k in kids:
            k.kill()
