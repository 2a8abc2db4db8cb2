"""Operating from Prefect: `rlhf serve` deployments, a run started through the API that fails in PPO, and
the UI's Retry re-running only PPO and what follows. Uses a reward model from another store by URL."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from flows.params import RunParams
from rlhf_core.storage.store import Store
from tests.conftest import PROJECT, snapshot
from tests.helpers import copy_trained, flow_run_artifacts, task_states

pytestmark = pytest.mark.slow


def wait_for_final(flow_run_id, timeout: float):
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(flow_run_id)
            if run.state.is_final():
                return run
            time.sleep(0.5)
    raise AssertionError(f"flow run {flow_run_id} still {run.state.name} after {timeout}s")


@pytest.fixture
def served(prefect_harness, tmp_path):
    """`rlhf serve --profile tiny` in a subprocess, pointed at the test harness's API."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    log = open(tmp_path / "serve.log", "w")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_RUNNER_POLL_FREQUENCY": "1",
           "PREFECT_LOGGING_LEVEL": "INFO",
           "RLHF_FAULT_KILL_AT_STEP": f"rl:1:{tmp_path / 'rl-kills'}:3"}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--profile", "tiny"], cwd=PROJECT,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 300
            while True:
                try:
                    client.read_deployment_by_name("rlhf-evaluate/tiny")
                    break
                except Exception:
                    assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                    assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                    time.sleep(0.5)
        yield tmp_path / "rl-kills", tmp_path / "serve.log"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_a_run_that_failed_in_ppo_is_retried_from_ppo(served, tiny_trained, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import AwaitingRetry

    kills, serve_log = served
    root = copy_trained(tiny_trained, tmp_path / "store")
    shutil.rmtree(root / "reward")  # the reward model comes from the other store, by URL
    reward_url = Store.from_config(tiny_trained["cfg"].storage).url_of("reward", tiny_trained["reward"].key)
    params = RunParams(profile="tiny", storage_root=str(root), reward_existing=reward_url, rl_max_steps=3,
                       overrides={"eval.num_prompts": 8})

    run = run_deployment("rlhf-pipeline/tiny", parameters={"params": params.model_dump(mode="json", exclude_defaults=True)},
                         timeout=0)
    run = wait_for_final(run.id, timeout=900)
    assert run.state.is_failed(), serve_log.read_text()[-3000:]
    states = task_states(run.id)
    failures = [line[:300] for line in serve_log.read_text().splitlines() if "Task run failed" in line]
    assert kills.read_text() == "3", failures  # every attempt of the PPO task was killed
    assert states["prepare-data"] == "Cached" and states["train-sft"] == "Cached", states
    assert states["use-reward-model"] == "Completed" and states["train-rl"] == "Failed", states
    assert "evaluate" not in states or states["evaluate"] != "Completed"
    before = snapshot(root / "sft") | snapshot(root / "reward") | snapshot(root / "data")

    # The UI's Retry: the failed flow run goes back to Scheduled/AwaitingRetry and the server runs it again.
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run.id, AwaitingRetry(message="Retry from the UI"), force=False)
    run = wait_for_final(run.id, timeout=900)
    assert run.state.is_completed(), serve_log.read_text()[-3000:]
    assert run.run_count == 2
    retried = task_states(run.id, attempt=2)
    assert {k: v for k, v in retried.items() if v == "Cached"}.keys() == {"prepare-data", "train-sft", "use-reward-model"}
    assert {retried[k] for k in ("train-rl", "export-actors", "evaluate")} == {"Completed"}, retried
    assert task_states(run.id, attempt=1) == states  # the first attempt's record is kept
    assert snapshot(root / "sft") | snapshot(root / "reward") | snapshot(root / "data") == before
    store = Store(str(root))
    for stage in ("rl", "export", "evaluate"):
        (m,) = store.list_outputs(stage)
        assert m.producer["flow_run_id"] == str(run.id)
    (reward,) = store.list_outputs("reward")
    assert reward.content_id == tiny_trained["reward"].content_id and reward.producer["imported_from"] == reward_url

    # The run summary links every output in the store; the long stages left progress artifacts.
    artifacts = flow_run_artifacts(run.id)
    (summary,) = [a for a in artifacts if a.key == "rlhf-run-summary"]
    for m in store.list_outputs():
        assert f"]({store.url_of(m.stage, m.key)})" in summary.data, m.stage
    (evaluation,) = store.list_outputs("evaluate")
    assert store.url_of("evaluate", evaluation.key, "report.md") in summary.data
    assert 100.0 in [a.data for a in artifacts if a.type == "progress"]  # PPO's progress, to the end

