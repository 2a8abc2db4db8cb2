"""`rlhf run` refuses what would fail later (the store root, S3 credentials, a folder given as a file, a step
without data) before any work, with one `rlhf:` line; `--until STAGE` runs up to a stage."""

import json
import os

import pytest

import flows.pipeline
import flows.stage_flows
from flows.cli import main
from flows.params import RunParams
from flows.pipeline import run_pipeline
from rlhf_core.config import ConfigError
from rlhf_core.storage.store import Store, check_root


@pytest.fixture
def no_flow(monkeypatch):
    """Fail if a flow starts: refusals come before Prefect."""
    def called(*a, **k):
        raise AssertionError("a flow started")

    monkeypatch.setattr(flows.pipeline, "rlhf_pipeline", called)
    for stage in list(flows.stage_flows.STAGE_FLOWS):
        monkeypatch.setitem(flows.stage_flows.STAGE_FLOWS, stage, called)


def _refused(capsys, *args: str) -> str:
    assert main(["run", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlhf: ") and "Traceback" not in err
    return err


def test_a_file_as_the_store_root(no_flow, tmp_path, capsys):
    root = tmp_path / "store"
    root.write_text("not a folder")
    err = _refused(capsys, "--set", f"storage.root={root}")
    assert f"storage.root file://{root} is a file, not a folder; point storage.root at a folder" in err


def test_a_store_root_that_cannot_be_created_leaves_nothing(no_flow, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    err = _refused(capsys, "--set", f"storage.root={tmp_path / 'f' / 'store'}")
    assert "cannot be created: " in err and "is a file" in err
    err = _refused(capsys, "--set", "storage.root=/proc/rlhf-store/x")
    assert "storage.root file:///proc/rlhf-store/x cannot be used:" in err and "point storage.root at a folder" in err
    assert not os.path.exists("/proc/rlhf-store")


def test_a_good_root_is_probed_and_left_as_it_was(tmp_path):
    check_root(str(tmp_path / "new" / "store"))
    assert not (tmp_path / "new").exists()  # the folders made for the probe are gone again
    (tmp_path / "kept").mkdir()
    check_root(str(tmp_path / "kept"))
    assert list((tmp_path / "kept").iterdir()) == []


def test_s3_without_credentials(no_flow, monkeypatch, capsys, tmp_path):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    err = _refused(capsys, "--set", "storage.root=s3://bucket/rlhf")
    assert "storage.root s3://bucket/rlhf needs AWS credentials and none were found: set AWS_ACCESS_KEY_ID" in err


def test_s3_bucket_that_does_not_exist(no_flow, s3_server, capsys):
    err = _refused(capsys, "--set", "storage.root=s3://no-such-bucket/rlhf")
    assert "storage.root s3://no-such-bucket/rlhf cannot be written" in err and "check the bucket name" in err
    check_root("s3://rlhf-test/preflight")  # the tests' bucket is fine, and nothing is left in it
    assert Store("s3://rlhf-test/preflight").fs.find("rlhf-test/preflight") == []


def test_a_folder_given_as_a_source_file(no_flow, tmp_path, capsys):
    (tmp_path / "pairs").mkdir()
    root = tmp_path / "store"
    source = json.dumps([{"name": "files", "path": str(tmp_path / "pairs")}])
    err = _refused(capsys, "--set", f"data.sources={source}", "--set", f"storage.root={root}")
    assert "data.sources.0: source files: path" in err and "is a folder; a files source reads one file here" in err
    assert not root.exists()


def test_a_step_without_data_is_refused_unless_the_run_stops_before_it(no_flow, tmp_path, capsys):
    root = tmp_path / "store"
    err = _refused(capsys, "--set", "data.split=1,0,1", "--set", f"storage.root={root}")
    assert "no source feeds the reward step (data.split is 1,0,1" in err and "--until" in err
    with pytest.raises(AssertionError, match="a flow started"):  # passes every check, then starts its flow
        main(["run", "--until", "sft", "--set", "data.split=1,0,1", "--set", f"storage.root={root}"])


def test_dpo_needs_the_reward_steps_pairs_even_without_a_reward_model(no_flow, tmp_path, capsys):
    root = tmp_path / "store"
    err = _refused(capsys, "--until", "rl", "--set", "rl.algorithm=dpo", "--set", "data.split=1,0,1",
                   "--set", f"storage.root={root}")
    assert "no source feeds the reward step (data.split is 1,0,1" in err


def test_the_flow_checks_before_its_first_task(tmp_path):
    """Outside the CLI (a deployment run from the UI) the flow refuses before submitting a task."""
    (tmp_path / "root").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        run_pipeline(RunParams(storage_root=str(tmp_path / "root")), until="data")


def test_until_data_runs_only_the_data_stage(prefect_harness, tmp_path, capsys):
    root = tmp_path / "store"
    assert main(["run", "--until", "data", "--set", f"storage.root={root}"]) == 0
    out = capsys.readouterr().out
    assert "data" in out and "Data sources:" in out and "source 0:local/jsonfile: read 4600, used sft 800 reward 1600 rl 1600" in out
    assert Store(str(root)).list_stages() == ["data"]
