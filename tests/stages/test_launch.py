import sys

from rlhf_core.config import load_config
from rlhf_core.stages.launch import command


def test_one_process_runs_the_entry_with_this_python():
    cfg = load_config("tiny")
    assert command(cfg.resources, "sft", "file:///s/job.json") == [sys.executable, "-m", "rlhf_core.stages.launch", "sft", "file:///s/job.json"]


def test_torchrun_command():
    cfg = load_config("tiny", {"resources.launcher": "torchrun", "resources.nproc_per_node": 4, "resources.master_port": 29600})
    cmd = command(cfg.resources, "rl", "s3://b/rl/k/job.json")
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert "--nproc_per_node=4" in cmd and "--nnodes=1" in cmd and "--master_port=29600" in cmd
    assert cmd[-4:] == ["-m", "rlhf_core.stages.launch", "rl", "s3://b/rl/k/job.json"]


def test_deepspeed_launcher_uses_the_hostfile_for_multi_node():
    cfg = load_config("multi_node")
    cmd = command(cfg.resources, "sft", "s3://b/sft/k/job.json")
    assert cmd[0] == "deepspeed" and "--no_local_rank" in cmd
    assert "--hostfile=/job/hostfile" in cmd and "--num_nodes=8" in cmd and "--num_gpus=8" in cmd
    assert cmd[-4:] == ["--module", "rlhf_core.stages.launch", "sft", "s3://b/sft/k/job.json"]


def _job_file(tmp_path, root: str) -> str:
    from rlhf_core.stages import registry
    from rlhf_core.stages.launch import make_job

    cfg = load_config("tiny", {"storage.root": root})
    job = make_job(cfg, "data", registry.key("data", cfg, {}), {})
    path = tmp_path / "job.json"
    path.write_text(job.model_dump_json())
    return str(path)


def test_a_worker_whose_store_cannot_be_reached_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    import botocore.exceptions
    import pytest

    from rlhf_core.stages import launch
    from rlhf_core.storage.store import STORE_UNAVAILABLE_EXIT

    def down(job):
        raise botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:9/b/rlhf/data/k/manifest.json")

    job = _job_file(tmp_path, "s3://b/rlhf")
    monkeypatch.setattr(launch, "run_job", down)
    assert launch.main(["data", job]) == STORE_UNAVAILABLE_EXIT
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("[data] the store s3://b/rlhf cannot be reached (EndpointConnectionError")

    # Negative control: any other error is a bug, and its traceback is wanted.
    def bug(job):
        raise ValueError("a bug")

    monkeypatch.setattr(launch, "run_job", bug)
    with pytest.raises(ValueError, match="a bug"):
        launch.main(["data", job])
