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
