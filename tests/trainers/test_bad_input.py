"""Bad input to the later stages: a clear error naming what and where, nothing overwritten."""

import shutil

import pytest

from rlhf_core.config import load_config
from rlhf_core.config.views import RLSettings
from rlhf_core.models.loading import ModelLoadError
from rlhf_core.models.reward_model import load_reward_model
from rlhf_core.storage.store import Store
from rlhf_core.trainers.rl import check_lengths
from tests.conftest import tiny_config
from tests.conftest import snapshot
from rlhf_core.stages import registry
from tests.helpers import copy_trained, output, worker

pytestmark = pytest.mark.slow


def test_prompts_that_leave_no_room_for_an_answer():
    cfg = RLSettings.from_config(load_config("tiny"))
    with pytest.raises(ValueError, match=r"exceed the actor's 20 positions: no room for an answer"):
        check_lengths(cfg, [[1] * 10], max_positions=20)
    with pytest.raises(ValueError, match=r"more than data.max_prompt_tokens"):
        check_lengths(cfg, [[1] * 40], max_positions=None)
    check_lengths(cfg, [[1] * 10], max_positions=64)


def test_an_actor_that_is_not_a_reward_model_is_refused(tiny_trained):
    store = Store.from_config(tiny_trained["cfg"].storage)
    with pytest.raises(ModelLoadError, match=r"is not a reward model: it has no value_head.safetensors"):
        load_reward_model(store.fetch("sft", tiny_trained["sft"].key, "model"))


def test_unloadable_reward_model_fails_ppo_with_its_path(tiny_trained, tmp_path):
    root = copy_trained(tiny_trained, tmp_path)
    up = {"data": tiny_trained["data"], "sft": tiny_trained["sft"], "reward": tiny_trained["reward"]}
    (root / "reward" / tiny_trained["reward"].key / "model" / "model.safetensors").write_bytes(b"corrupt")
    cfg = tiny_config(root, **{"rl.max_steps": 2})
    proc = worker(cfg, "rl", up)
    assert proc.returncode != 0
    assert "cannot load the reward model backbone from" in proc.stdout + proc.stderr
    assert output(cfg, "rl", up) is None


def test_checkpoint_from_another_config_is_refused_and_kept(tiny_trained, tmp_path):
    """A checkpoint copied under another config's key: the stage refuses to resume from it and leaves it."""
    root = copy_trained(tiny_trained, tmp_path)
    up = {"data": tiny_trained["data"], "sft": tiny_trained["sft"], "reward": tiny_trained["reward"]}
    a = tiny_config(root, **{"rl.max_steps": 6, "rl.checkpoint_every": 2, "storage.keep_checkpoints_after_commit": True})
    b = tiny_config(root, **{"rl.max_steps": 6, "rl.checkpoint_every": 2, "rl.kl.coef": 0.5})
    assert worker(a, "rl", up).returncode == 0
    key_a, key_b = output(a, "rl", up).key, registry.key("rl", b, up)
    shutil.copytree(root / "rl" / key_a / "checkpoints", root / "rl" / key_b / "checkpoints")
    before = snapshot(root / "rl" / key_b / "checkpoints")
    proc = worker(b, "rl", up)
    assert proc.returncode != 0
    assert f"was written for stage key '{key_a}'" in proc.stdout + proc.stderr
    assert snapshot(root / "rl" / key_b / "checkpoints") == before  # nothing overwritten or deleted
    assert output(b, "rl", up) is None
