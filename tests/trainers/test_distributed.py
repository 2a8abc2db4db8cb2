"""Two processes under torchrun (gloo, CPU) give the same SFT result as one, at ZeRO-2 and ZeRO-3: the
global batch and the loss normalisation do not depend on the world size."""

import pytest

from tests.conftest import tiny_config
from tests.helpers import assert_same_weights, output, prepare, weights, worker

pytestmark = pytest.mark.slow
STEPS = {"sft.max_steps": 12, "sft.checkpoint_every": 100, "sft.micro_batch_size": 16}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("one"), **STEPS, **{"sft.deepspeed.zero_stage": 2})
    up = {"data": prepare(cfg)}
    proc = worker(cfg, "sft", up)
    assert proc.returncode == 0, proc.stdout[-2000:]
    return cfg, output(cfg, "sft", up)


@pytest.mark.parametrize("zero", [2, 3])
def test_two_processes_match_one(one_process, zero, tmp_path):
    ref_cfg, ref = one_process
    cfg = tiny_config(tmp_path, **{**STEPS, "sft.micro_batch_size": 8, "sft.deepspeed.zero_stage": zero,
                                   "resources.nproc_per_node": 2, "resources.launcher": "torchrun"})
    up = {"data": prepare(cfg)}
    proc = worker(cfg, "sft", up)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = output(cfg, "sft", up)
    assert "global batch 16 = micro 8 x accum 1 x 2 procs" in proc.stdout
    assert got.metrics["eval_loss"] == pytest.approx(ref.metrics["eval_loss"], abs=2e-4)
    assert_same_weights(weights(ref_cfg, ref), weights(cfg, got), atol=2e-4)


def test_a_killed_rank_fails_the_stage_and_every_rank_resumes(tmp_path):
    """SIGKILL of rank 1 alone: the launcher ends the stage with an error (no hang), and the next attempt
    resumes both ranks from the last complete checkpoint to the uninterrupted result."""
    from rlhf_core.storage.store import Store

    two = {**STEPS, "sft.max_steps": 12, "sft.checkpoint_every": 4, "sft.micro_batch_size": 8,
           "resources.nproc_per_node": 2, "resources.launcher": "torchrun"}
    ref_cfg = tiny_config(tmp_path / "ref", **two)
    cfg = tiny_config(tmp_path / "killed", **two)
    up_ref, up = {"data": prepare(ref_cfg)}, {"data": prepare(cfg)}
    assert worker(ref_cfg, "sft", up_ref).returncode == 0
    crashed = worker(cfg, "sft", up, fault="sft:10", env={"RLHF_FAULT_RANK": "1"}, timeout=900)
    assert crashed.returncode != 0  # the launcher noticed and failed the stage instead of waiting
    key = output(ref_cfg, "sft", up_ref).key
    assert Store.from_config(cfg.storage).latest_checkpoint("sft", key) == 8
    resumed = worker(cfg, "sft", up)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert resumed.stdout.count("resumed from checkpoint step 8") == 1  # printed by rank 0; rank 1 resumed too
    assert output(cfg, "sft", up).metrics["resumed_from"] == [8]
    assert_same_weights(weights(ref_cfg, output(ref_cfg, "sft", up_ref)), weights(cfg, output(cfg, "sft", up)))
