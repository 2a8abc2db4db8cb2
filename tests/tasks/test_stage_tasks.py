"""The SFT and reward tasks through Prefect: cache keys, sharing, retry-resume."""

import pytest
from prefect import flow

from rlhf_core.stages import registry as stages
from tasks.train_reward import train_reward
from tasks.train_sft import train_sft
from tests.conftest import tiny_config
from tests.helpers import prepare

pytestmark = pytest.mark.slow


@flow
def _reward(cfg, data):
    f = train_reward.submit(cfg, data)
    f.wait()
    return f.state.name, f.result()


def test_changing_only_the_actor_is_a_cache_hit_for_reward(prefect_harness, tiny_trained):
    base, data = tiny_trained["cfg"], tiny_trained["data"]
    other_actor = tiny_config(base.storage.root, **{
        "models.actor.init_seed": 77, "models.actor.architecture.num_hidden_layers": 3, "sft.optimizer.lr": 1e-3})
    assert stages.key("sft", other_actor, {"data": data}) != stages.key("sft", base, {"data": data})
    assert stages.key("reward", other_actor, {"data": data}) == stages.key("reward", base, {"data": data})
    state, manifest = _reward(other_actor, data)
    assert state == "Cached" and manifest == tiny_trained["reward"]
    # Negative control: a reward setting does change the key.
    changed = tiny_config(base.storage.root, **{"reward.optimizer.lr": 5e-4})
    assert stages.key("reward", changed, {"data": data}) != stages.key("reward", base, {"data": data})


def test_task_retry_resumes_a_killed_worker_from_its_checkpoint(prefect_harness, tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path / "store", **{"sft.max_steps": 30, "sft.checkpoint_every": 10})
    data = prepare(cfg)
    monkeypatch.setenv("RLHF_FAULT_KILL_AT_STEP", f"sft:25:{tmp_path / 'killed-once'}")

    @flow
    def run():
        f = train_sft.with_options(retries=1, retry_delay_seconds=0).submit(cfg, data)
        f.wait()
        return f.state.name, f.result()

    state, manifest = run()
    assert (tmp_path / "killed-once").exists()  # the first attempt really was killed
    assert state == "Completed" and manifest.metrics["steps"] == 30
    assert manifest.metrics["resumed_from"] == [20]


def test_a_prefect_api_hiccup_on_the_progress_artifact_does_not_stop_training(prefect_harness, tmp_path, monkeypatch):
    import prefect.artifacts

    def refused(*args, **kwargs):
        raise ConnectionRefusedError(111, "Connect call failed")  # what httpx saw when the API went away

    cfg = tiny_config(tmp_path / "store", **{"sft.max_steps": 5})
    data = prepare(cfg)
    monkeypatch.setattr(prefect.artifacts, "update_progress_artifact", refused)

    @flow
    def run():
        f = train_sft.with_options(retries=0).submit(cfg, data)
        f.wait()
        return f.state.name, f.result(raise_on_failure=False)

    state, manifest = run()
    assert state == "Completed" and manifest.metrics["steps"] == 5
