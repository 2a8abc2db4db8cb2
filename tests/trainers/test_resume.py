"""SIGKILL a worker mid-stage, run it again: it resumes from its last checkpoint and ends with exactly the
weights (and metric history) of an uninterrupted run (CPU, deterministic)."""

import signal

import pytest

from rlhf_core.storage.store import Store
from tests.conftest import tiny_config
from tests.helpers import assert_same_weights, copy_trained, output, prepare, weights, worker

pytestmark = pytest.mark.slow

CASES = {
    # stage: (overrides, kill after step, checkpoint expected)
    "sft": ({"sft.max_steps": 30, "sft.checkpoint_every": 10, "sft.eval_every": 10}, 25, 20),
    "reward": ({"reward.max_steps": 30, "reward.checkpoint_every": 10, "reward.eval_every": 10}, 25, 20),
}


@pytest.mark.parametrize("stage", sorted(CASES))
def test_killed_stage_resumes_to_identical_weights(stage, tmp_path):
    overrides, kill_at, ckpt = CASES[stage]
    ref_cfg = tiny_config(tmp_path / "uninterrupted", **overrides)
    cfg = tiny_config(tmp_path / "killed", **overrides)
    up_ref, up = {"data": prepare(ref_cfg)}, {"data": prepare(cfg)}

    assert worker(ref_cfg, stage, up_ref).returncode == 0
    crashed = worker(cfg, stage, up, fault=f"{stage}:{kill_at}")
    assert crashed.returncode == -signal.SIGKILL
    store = Store.from_config(cfg.storage)
    key = output(ref_cfg, stage, up_ref).key
    assert store.latest_checkpoint(stage, key) == ckpt and not store.has_output(stage, key)

    resumed = worker(cfg, stage, up)
    assert resumed.returncode == 0, resumed.stdout[-2000:]
    assert f"resumed from checkpoint step {ckpt}" in resumed.stdout
    assert output(cfg, stage, up).metrics["resumed_from"] == [ckpt]
    ref, got = output(ref_cfg, stage, up_ref), output(cfg, stage, up)
    assert_same_weights(weights(ref_cfg, ref), weights(cfg, got))
    if stage == "reward":
        assert_same_weights(weights(ref_cfg, ref, "model/value_head.safetensors"),
                            weights(cfg, got, "model/value_head.safetensors"))
    assert ref.metrics["train_loss"] == got.metrics["train_loss"]
    # Every file of the exported model is byte-identical (logs carry wall-clock timings, which may not be).
    model_files = lambda m: {(f.path, f.sha256) for f in m.files if f.path.startswith("model/")}  # noqa: E731
    assert model_files(ref) == model_files(got)


def test_negative_control_a_fresh_start_is_not_identical(tmp_path):
    """Without restoring the data position the continuation differs: the equality above is not vacuous."""
    overrides = {"sft.max_steps": 30, "sft.checkpoint_every": 10, "sft.seed": 99}
    a = tiny_config(tmp_path / "a", **CASES["sft"][0])
    b = tiny_config(tmp_path / "b", **overrides)
    ua, ub = {"data": prepare(a)}, {"data": prepare(b)}
    assert worker(a, "sft", ua).returncode == 0 and worker(b, "sft", ub).returncode == 0
    with pytest.raises(AssertionError):
        assert_same_weights(weights(a, output(a, "sft", ua)), weights(b, output(b, "sft", ub)))


# Step 3 per algorithm: PPO (actor, critic, EMA, KL controller), GRPO (n answers per prompt, no critic), DPO (the
# shared loop with the EMA in its checkpoint).
STEP3 = {
    "ppo": {},
    "grpo": {"rl.algorithm": "grpo", "rl.n_samples_per_prompt": 4, "rl.rollout_batch_size": 8},
    "dpo": {"rl.algorithm": "dpo"},
}


@pytest.mark.parametrize("algorithm", sorted(STEP3))
def test_killed_step3_resumes_to_identical_models(tiny_trained, tmp_path, algorithm):
    """SIGKILL during step 3 between checkpoints; the rerun resumes and every exported model is identical."""
    overrides = {"rl.max_steps": 14, "rl.checkpoint_every": 5, "mixture.ptx_coef": 0.5, **STEP3[algorithm]}
    up = {"data": tiny_trained["data"], "sft": tiny_trained["sft"], "reward": tiny_trained["reward"]}
    ref_cfg = tiny_config(copy_trained(tiny_trained, tmp_path / "uninterrupted"), **overrides)
    cfg = tiny_config(copy_trained(tiny_trained, tmp_path / "killed"), **overrides)
    assert worker(ref_cfg, "rl", up).returncode == 0
    assert worker(cfg, "rl", up, fault="rl:12").returncode == -signal.SIGKILL
    assert Store.from_config(cfg.storage).latest_checkpoint("rl", output(ref_cfg, "rl", up).key) == 10
    resumed = worker(cfg, "rl", up)
    assert resumed.returncode == 0, resumed.stdout[-2000:]
    ref, got = output(ref_cfg, "rl", up), output(cfg, "rl", up)
    assert got.metrics["resumed_from"] == [10]
    models = [("actor", "model.safetensors"), ("actor_ema", "model.safetensors")]
    if algorithm == "ppo":
        models += [("critic", "model.safetensors"), ("critic", "value_head.safetensors")]
    else:  # no critic was built, none is saved
        assert not any(f.path.startswith("critic/") for f in got.files)
    for folder, name in models:
        assert_same_weights(weights(ref_cfg, ref, f"{folder}/{name}"), weights(cfg, got, f"{folder}/{name}"))
