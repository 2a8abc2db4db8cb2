import pytest

from rlhf_core.config import DeepSpeedConfig, OptimizerConfig
from rlhf_core.engines.training import build_ds_config, sanitize_cuda_arch_list
from rlhf_core.data.batches import epoch_batches


def test_ds_config_from_stage_settings():
    ds = DeepSpeedConfig(zero_stage=3, offload_optimizer=True, offload_params=True, precision="bf16",
                         gradient_clipping=0.5, extra={"zero_optimization": {"reduce_bucket_size": 123}, "x": 1})
    cfg = build_ds_config(ds, OptimizerConfig(impl="deepspeed", lr=3e-4), micro_batch=4, grad_accum=8, world_size=2)
    assert cfg["train_batch_size"] == 64 and cfg["gradient_accumulation_steps"] == 8
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 123  # user passthrough, merged deeply
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"] and cfg["gradient_clipping"] == 0.5
    assert cfg["optimizer"]["type"] == "AdamW" and cfg["optimizer"]["params"]["lr"] == 3e-4 and cfg["x"] == 1


def test_torch_optimizer_builds_nothing():
    cfg = build_ds_config(DeepSpeedConfig(), OptimizerConfig(impl="torch"), 2, 1, 1)
    assert "optimizer" not in cfg and cfg["zero_optimization"]["stage"] == 0


@pytest.mark.parametrize("given, expected", [("9.0a", "9.0"), ("8.0;9.0a", "8.0 9.0"), ("9.0", "9.0"),
                                             ("8.6+PTX 9.0a", "8.6+PTX 9.0")])
def test_hopper_arch_list_is_made_buildable(monkeypatch, given, expected):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", given)
    sanitize_cuda_arch_list()
    import os

    assert os.environ["TORCH_CUDA_ARCH_LIST"] == expected


def test_batch_schedule_splits_global_batches_over_ranks():
    one = epoch_batches(10, micro=4, world=1, seed=7, epoch=0)
    two = epoch_batches(10, micro=2, world=2, seed=7, epoch=0)
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        assert a[0] == b[0] + b[1]  # the same rows, split between the two ranks
    assert epoch_batches(10, 4, 1, 7, 1) != one  # a new order each epoch


def test_non_finite_gradient_norm_stops_training():
    from rlhf_core.engines.training import NonFiniteGradient, check_finite_grad_norm

    class FakeEngine:
        def __init__(self, norm, bf16=True):
            self.norm, self.bf16 = norm, bf16

        def bfloat16_enabled(self):
            return self.bf16

        def get_global_grad_norm(self):
            return self.norm

    check_finite_grad_norm(FakeEngine(3.5), "sft")
    check_finite_grad_norm(FakeEngine(None), "sft")
    check_finite_grad_norm(FakeEngine(float("nan"), bf16=False), "sft")  # fp16/fp32: DeepSpeed's own handling
    for bad in (float("nan"), float("inf")):
        with pytest.raises(NonFiniteGradient, match="rl actor: gradient norm is"):
            check_finite_grad_norm(FakeEngine(bad), "rl actor")


def test_bf16_skips_deepspeeds_per_partition_overflow_check_unless_asked():
    cfg = build_ds_config(DeepSpeedConfig(precision="bf16"), OptimizerConfig(), 2, 1, 1)
    assert cfg["bf16"] == {"enabled": True, "check_grad_overflow": False}
    again = build_ds_config(DeepSpeedConfig(precision="bf16", extra={"bf16": {"check_grad_overflow": True}}),
                            OptimizerConfig(), 2, 1, 1)
    assert again["bf16"]["check_grad_overflow"] is True
