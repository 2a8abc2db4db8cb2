"""Operating several runs at once through Prefect: one reward model shared by concurrent runs, a killed
holder taken over at once, GPU slots that serialise training stages, reward.existing by key, and
bad input refused before any work starts."""

import concurrent.futures
import datetime
import os
import signal
import subprocess
import sys
import time

import pytest
from prefect import flow

from flows.params import RunParams
from flows.pipeline import rlhf_pipeline
from flows.stage_flows import reward_flow
from rlhf_core.stages import registry as stages
from rlhf_core.storage.lease import lease_path, read_record
from rlhf_core.storage.store import Store
from tasks.runner import GPU_LIMIT, ensure_gpu_limit, gpu_slots_held
from tasks.train_reward import train_reward
from tasks.train_sft import train_sft
from tests.conftest import PROJECT, tiny_config
from tests.helpers import copy_trained, task_runs, task_states

pytestmark = pytest.mark.slow


def _span(m) -> tuple[datetime.datetime, datetime.datetime]:
    """When a stage's worker started and when it committed its output."""
    return datetime.datetime.fromisoformat(m.producer["started_at"]), datetime.datetime.fromisoformat(m.created_at)


def _delete_gpu_limit() -> None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.delete_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            pass


def _active_slots() -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(GPU_LIMIT).active_slots


# ---------------------------------------------------------------------------------------- shared reward


def test_two_runs_at_once_with_different_actors_train_the_reward_model_once(prefect_harness, tiny_trained, tmp_path):
    root = copy_trained(tiny_trained, tmp_path / "store")
    shared = {"reward.max_steps": 60, "storage.lease_seconds": 20}  # a reward model nobody has trained yet
    runs = [RunParams(profile="tiny", storage_root=str(root), overrides={**shared, "models.actor.init_seed": 5}),
            RunParams(profile="tiny", storage_root=str(root), overrides={
                **shared, "models.actor.init_seed": 6, "models.actor.architecture.num_hidden_layers": 3})]
    data = tiny_trained["data"]
    assert stages.key("sft", runs[0].config(), {"data": data}) != stages.key("sft", runs[1].config(), {"data": data})  # different actors
    key = stages.key("reward", runs[0].config(), {"data": data})
    assert stages.key("reward", runs[1].config(), {"data": data}) == key  # the same reward settings

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        states = list(pool.map(lambda p: reward_flow(p, return_state=True), runs))
    assert all(s.is_completed() for s in states)
    reward = Store(str(root)).read_manifest("reward", key)
    trained = [s for s in states if str(s.state_details.flow_run_id) == reward.producer["flow_run_id"]]
    (waited,) = [s for s in states if s not in trained]
    assert task_states(trained[0].state_details.flow_run_id)["train-reward"] == "Completed"
    assert task_states(waited.state_details.flow_run_id)["train-reward"] == "Cached"
    # The run that found it Cached started looking before it existed: it waited for the holder's lease.
    run = task_runs(waited.state_details.flow_run_id)["train-reward"]
    assert run.start_time < datetime.datetime.fromisoformat(reward.created_at) < run.end_time
    assert Store(str(root)).read_bytes("reward", key, "logs/metrics.jsonl")  # one training, one output
    assert not Store(str(root)).fs.exists(lease_path(Store(str(root)), "reward", key))  # released


def test_a_killed_reward_holder_is_taken_over_at_once(prefect_harness, tiny_trained, tmp_path):
    """The holder's process is SIGKILLed mid-training: its worker dies with it (the reaper), and the next
    run takes the stage over at once, not after the lease's 600 s, resuming from the killed run's checkpoint."""
    from prefect.settings import PREFECT_API_URL

    root = copy_trained(tiny_trained, tmp_path / "store")
    params = RunParams(profile="tiny", storage_root=str(root), reward_max_steps=150,
                       overrides={"reward.checkpoint_every": 10})
    assert params.config().storage.lease_seconds == 600
    store, key = Store(str(root)), stages.key("reward", params.config(), {"data": tiny_trained["data"]})
    script = ("import sys; from flows.params import RunParams; from flows.stage_flows import reward_flow; "
              "reward_flow(RunParams.model_validate_json(sys.argv[1]))")
    holder = subprocess.Popen([sys.executable, "-c", script, params.model_dump_json()], cwd=PROJECT,
                              env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while store.latest_checkpoint("reward", key) is None:  # it holds the lease and is training
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        holder.send_signal(signal.SIGKILL)  # the flow run's process only, mid-training
    holder.wait()
    lease = read_record(store, lease_path(store, "reward", key))
    assert lease is not None and not store.has_output("reward", key)  # killed while holding, nothing committed
    killed_run = lease.holder["flow_run_id"]
    assert _flow_run_state(killed_run) == "Running"  # nothing reported its end
    assert lease.process.pid == holder.pid and len(lease.workers) == 1  # the worker's group, in its own session
    deadline = time.monotonic() + 120
    while not lease.workers[0].group_gone():  # stopped by the killed process's reaper, not orphaned
        assert time.monotonic() < deadline, "the reward worker outlived the process that launched it"
        time.sleep(0.1)

    state = reward_flow(params, return_state=True)
    assert state.is_completed()
    m = store.read_manifest("reward", key)
    started, _ = _span(m)
    assert started.timestamp() < lease.expires_at  # it did not wait for the lease to expire
    assert m.metrics["resumed_from"] and m.metrics["resumed_from"][0] >= 10  # from the killed run's checkpoint
    assert m.metrics["steps"] == 150 and m.producer["flow_run_id"] == str(state.state_details.flow_run_id)
    assert _flow_run_state(killed_run) == "Crashed"  # marked by the run that took over


def _flow_run_state(flow_run_id: str) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state.name


# -------------------------------------------------------------------------------------------- GPU slots


@flow
def _sft_and_reward(cfg, data):
    """SFT and reward submitted at the same time, as the pipeline does."""
    sft, reward = train_sft.submit(cfg, data), train_reward.submit(cfg, data)
    return sft.result(), reward.result()


@pytest.mark.parametrize("gpu_slots", [1, 0])
def test_a_gpu_limit_of_one_never_runs_two_training_stages_at_once(prefect_harness, tiny_trained, tmp_path, gpu_slots):
    """gpu_slots 0 is the negative control: the same two stages overlap. SFT trains for 100 steps so that, on
    a loaded machine too, the reward worker starts (and ends) inside SFT's span when nothing gates them."""
    root = copy_trained(tiny_trained, tmp_path / "store")
    cfg = tiny_config(root, **{"sft.max_steps": 100, "reward.max_steps": 5, "resources.gpu_slots": gpu_slots})
    ensure_gpu_limit(1)  # what `rlhf serve --gpus 1` does
    try:
        sft, reward = _sft_and_reward(cfg, tiny_trained["data"])
    finally:
        _delete_gpu_limit()
    (s1, e1), (s2, e2) = _span(sft), _span(reward)
    apart = e1 <= s2 or e2 <= s1
    assert apart == (gpu_slots == 1), {"sft": (s1, e1), "reward": (s2, e2)}


def test_a_missing_gpu_limit_is_created_and_one_too_small_is_refused(prefect_harness, tmp_path):
    _delete_gpu_limit()
    cfg = tiny_config(tmp_path, **{"resources.gpu_slots": 1})
    with gpu_slots_held(cfg, 1):
        assert _active_slots() == 1  # created on demand (1 slot on a machine without GPUs) and held
    assert _active_slots() == 0
    with pytest.raises(ValueError, match=r"gpu_slots is 2 but .*'rlhf-gpu' has 1 slots.*rlhf serve --gpus 2"):
        with gpu_slots_held(cfg, 2):
            pass
    _delete_gpu_limit()


# -------------------------------------------------------------------------------- reward.existing, input


def test_an_existing_reward_model_by_key_skips_reward_training(prefect_harness, tiny_trained, tmp_path):
    root = copy_trained(tiny_trained, tmp_path / "store")
    state = reward_flow(RunParams(profile="tiny", storage_root=str(root), reward_existing=tiny_trained["reward"].key),
                        return_state=True)
    assert state.is_completed()
    assert task_states(state.state_details.flow_run_id) == {"prepare-data": "Cached", "use-reward-model": "Cached"}
    assert state.result()["outputs"]["reward"] == Store(str(root)).url_of("reward", tiny_trained["reward"].key)


@pytest.mark.parametrize("params, message", [
    (RunParams(profile="nope"), "unknown profile 'nope': known profiles are"),
    (RunParams(overrides={"rl.kl.coef": "lots"}), "rl.kl.coef: Input should be a valid number"),
    (RunParams(overrides={"rl.kl.coeff": 0.1}), "unknown key 'rl.kl.coeff'"),
    (RunParams(reward_existing="file:///nowhere/reward/" + "0" * 20), "no manifest.json at file:///nowhere/reward/"),
    (RunParams(rl_kl_coef=0.1, overrides={"rl.kl.coef": 0.2}), "rl_kl_coef=0.1 and overrides"),
])
def test_bad_input_fails_the_flow_before_any_task(prefect_harness, tmp_path, params, message):
    params = params.model_copy(update={"storage_root": str(tmp_path / "store")})
    state = rlhf_pipeline(params, return_state=True)
    assert state.is_failed() and message in state.message
    assert task_states(state.state_details.flow_run_id) == {}
    assert not (tmp_path / "store").exists()
