"""Step 3's memory placement: the LoRA actor with its adapters off is the reference (no second copy), and
'auto' keeps frozen models on the device while they fit, moving the largest to host memory first."""

import pytest
import torch

from rlhf_core.config import LoraConfig, OptimizerConfig, RLConfig
from rlhf_core.config.schema import DeepSpeedConfig
from rlhf_core.trainers.experience import AdaptersOff, placement, sequence_logprobs, shares_reference

GiB = 2**30


def _rl(**kw) -> RLConfig:
    return RLConfig(**kw)


def test_auto_keeps_everything_on_the_device_while_it_fits():
    sizes = {"reference": 60 * GiB, "reward": 1 * GiB}
    assert placement(_rl(), torch.device("cuda"), sizes, reserve=20 * GiB, free=100 * GiB, log=lambda m: None) == \
        {"reference": False, "reward": False}


def test_auto_moves_the_largest_frozen_model_to_the_host_first():
    sizes = {"reference": 60 * GiB, "reward": 1 * GiB}
    assert placement(_rl(), torch.device("cuda"), sizes, reserve=20 * GiB, free=50 * GiB, log=lambda m: None) == \
        {"reference": True, "reward": False}
    # Not even the reward model fits beside the reserve: both go.
    assert placement(_rl(), torch.device("cuda"), sizes, reserve=20 * GiB, free=20 * GiB, log=lambda m: None) == \
        {"reference": True, "reward": True}


def test_a_flag_set_to_true_wins_and_manual_is_the_flags_alone():
    sizes = {"reference": 1 * GiB, "reward": 1 * GiB}
    forced = _rl(offload_reward=True)
    assert placement(forced, torch.device("cuda"), sizes, reserve=0, free=100 * GiB, log=lambda m: None)["reward"]
    manual = _rl(placement="manual")
    assert placement(manual, torch.device("cuda"), sizes, reserve=0, free=0, log=lambda m: None) == \
        {"reference": False, "reward": False}  # negative control: 'manual' does not fit anything to memory
    assert placement(_rl(), torch.device("cpu"), sizes, reserve=0, free=0, log=lambda m: None) == \
        {"reference": False, "reward": False}  # nothing to move to on a CPU


def test_only_a_frozen_base_shares_the_reference():
    assert shares_reference(LoraConfig(enabled=True))
    assert not shares_reference(LoraConfig(enabled=True, only_optimize_lora=False))
    assert not shares_reference(LoraConfig(enabled=False))


@pytest.mark.slow
def test_the_actor_with_adapters_off_is_the_sft_model_after_training(tiny_trained):
    """After a LoRA step the actor differs from where it started, and AdaptersOff still equals a separately
    loaded SFT model (the reference it replaces) exactly."""
    from rlhf_core.engines.training import build_ds_config, init_distributed, initialize
    from rlhf_core.models.causal_lm import load_causal_lm
    from rlhf_core.models.lora import for_training
    from rlhf_core.storage.store import Store

    init_distributed("cpu", cpu_threads=1)
    store = Store.from_config(tiny_trained["cfg"].storage)
    sft_path = store.fetch("sft", tiny_trained["sft"].key, "model")
    lora = LoraConfig(enabled=True, r=4, alpha=8, target_modules=["q_proj", "v_proj", "fc1"])
    opt = OptimizerConfig(lr=1e-2, scheduler="constant")
    ds = build_ds_config(DeepSpeedConfig(), opt, 4, 1, 1)
    engine = initialize(for_training(load_causal_lm(sft_path, dropout=0.0), lora, False), ds, opt, 10)
    ids = torch.randint(5, 60, (4, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    loss = -sequence_logprobs(engine, ids, mask, 4).mean()
    engine.backward(loss)
    engine.step()
    engine.eval()
    reference = load_causal_lm(sft_path).eval()
    with torch.no_grad():
        want = sequence_logprobs(reference, ids, mask, 4)
        shared = sequence_logprobs(AdaptersOff(engine), ids, mask, 4)
        trained = sequence_logprobs(engine, ids, mask, 4)
    torch.testing.assert_close(shared, want, atol=1e-5, rtol=0)
    assert (trained - want).abs().max() > 1e-3  # the adapters did move the actor: the equality is not vacuous
