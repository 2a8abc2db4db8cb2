"""Resume a stage from a chosen checkpoint: `rlhf run --resume-from STAGE:step-N`."""

import json
import signal
import subprocess

import pytest

from flows.cli import main
from rlhf_core.config import ConfigError
from rlhf_core.stages import registry
from rlhf_core.stages.rewind import parse_resume_from, rewind, stage_key
from rlhf_core.storage.lease import StageLease
from rlhf_core.storage.process import machine_id, process_id
from rlhf_core.storage.store import Store
from tests.conftest import tiny_config
from tests.helpers import assert_same_weights, output, prepare, weights, worker


def test_the_resume_spec():
    assert parse_resume_from("rl:step-20") == ("rl", 20) and parse_resume_from("sft:100") == ("sft", 100)
    with pytest.raises(ConfigError, match="must look like STAGE:step-N"):
        parse_resume_from("rl-20")
    with pytest.raises(ConfigError, match="'export' has no checkpoints; the training stages are sft, reward, rl"):
        parse_resume_from("export:step-1")


def _checkpoints(store: Store, stage: str, key: str, steps, complete=True):
    for step in steps:
        folder = store.checkpoint_path(stage, key, step)
        store.fs.makedirs(folder, exist_ok=True)
        store.fs.pipe_file(f"{folder}/weights", b"w")
        if complete:
            store.fs.pipe_file(f"{folder}/COMPLETE", json.dumps({"step": step}).encode())


def test_dropping_later_checkpoints_leaves_the_chosen_one_latest(tmp_path):
    store = Store(str(tmp_path))
    _checkpoints(store, "sft", "k" * 20, [10, 20, 30])
    _checkpoints(store, "sft", "k" * 20, [40], complete=False)  # an attempt killed while writing it
    assert store.drop_checkpoints_after("sft", "k" * 20, 10) == [40, 30, 20]
    assert store.list_checkpoints("sft", "k" * 20) == [10] and store.latest_checkpoint("sft", "k" * 20) == 10


@pytest.fixture
def data_only(tmp_path):
    cfg = tiny_config(tmp_path / "store")
    prepare(cfg)
    store = Store.from_config(cfg.storage)
    return cfg, store, stage_key(cfg, registry.SFT, store)


def test_rewind_refuses_what_cannot_be_resumed(data_only):
    cfg, store, key = data_only
    _checkpoints(store, "sft", key, [10, 20])
    with pytest.raises(ConfigError, match=r"has no complete checkpoint at step 15 \(complete: step-10, step-20;"):
        rewind(cfg, "sft", 15)
    with pytest.raises(ConfigError, match="its input sft .* is not complete"):
        rewind(cfg, "rl", 10)
    lease = StageLease(store, "sft", key, ttl=60, holder={"host": "elsewhere", "pid": 1})
    assert lease.try_acquire()
    with pytest.raises(ConfigError, match="another run is producing .*elsewhere"):
        rewind(cfg, "sft", 10)
    lease.release()
    assert store.list_checkpoints("sft", key) == [10, 20]  # nothing was removed by a refusal
    if machine_id() is not None:  # a holder SIGKILLed on this machine holds nothing (the run takes it over at once)
        killed = subprocess.Popen(["sleep", "600"])
        gone = process_id(killed.pid)
        killed.kill()
        killed.wait()
        assert lease.try_acquire()
        record = lease.read().model_copy(update={"process": gone})
        store.write_bytes_atomic(lease.path, record.model_dump_json().encode())
        assert not record.expired() and record.holder_gone()
        assert rewind(cfg, "sft", 20) == []
        store.fs.rm_file(lease.path)
    said = []
    assert rewind(cfg, "sft", 10, log=said.append) == [20]
    assert store.list_checkpoints("sft", key) == [10] and "removed the later step-20" in said[0]


def test_rlhf_run_resume_from_is_checked_before_any_work(data_only, capsys, monkeypatch):
    import flows.pipeline

    cfg, store, key = data_only
    monkeypatch.setattr(flows.pipeline, "rlhf_pipeline", lambda *a, **k: pytest.fail("the pipeline started"))
    root = ["--set", f"storage.root={cfg.storage.root}"]
    assert main(["run", *root, "--until", "sft", "--resume-from", "rl:step-5"]) == 2
    assert "this run stops at sft, before rl" in capsys.readouterr().err
    assert main(["run", *root, "--resume-from", "sft:step-5"]) == 2
    assert "no complete checkpoint at step 5 (complete: none" in capsys.readouterr().err


@pytest.mark.slow
def test_a_stage_resumed_from_an_earlier_checkpoint_ends_as_an_uninterrupted_run(tmp_path):
    """SFT killed after step 25 with checkpoints at 10 and 20; told to resume from step 10, it drops step 20,
    continues from 10 and ends with the uninterrupted run's weights."""
    overrides = {"sft.max_steps": 30, "sft.checkpoint_every": 10, "sft.eval_every": 10,
                 "storage.checkpoints_to_keep": 3}
    ref_cfg, cfg = tiny_config(tmp_path / "ref", **overrides), tiny_config(tmp_path / "killed", **overrides)
    up_ref, up = {"data": prepare(ref_cfg)}, {"data": prepare(cfg)}
    assert worker(ref_cfg, "sft", up_ref).returncode == 0
    assert worker(cfg, "sft", up, fault="sft:25").returncode == -signal.SIGKILL
    store = Store.from_config(cfg.storage)
    key = stage_key(cfg, "sft", store)
    assert store.list_checkpoints("sft", key) == [10, 20]
    assert rewind(cfg, "sft", 10) == [20]
    resumed = worker(cfg, "sft", up)
    assert resumed.returncode == 0, resumed.stdout[-2000:]
    assert "resumed from checkpoint step 10" in resumed.stdout
    got, ref = output(cfg, "sft", up), output(ref_cfg, "sft", up_ref)
    assert got.metrics["resumed_from"] == [10]
    assert_same_weights(weights(ref_cfg, ref), weights(cfg, got))
