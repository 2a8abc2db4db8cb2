"""DPO, cDPO, IPO and SimPO losses on hand-computed numbers, plus properties."""

import math

import pytest
import torch

from rlhf_core.maths.preference import PREFERENCE_LOSSES, PairLogps, answer_logps

POLICY = PairLogps(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([2.0]), torch.tensor([4.0]))
REF = PairLogps(torch.tensor([-2.0]), torch.tensor([-2.0]), torch.tensor([2.0]), torch.tensor([4.0]))


def test_dpo_by_hand():
    # log-ratios: chosen -1 - (-2) = 1, rejected -3 - (-2) = -1; beta 0.5 -> logits 0.5 * 2 = 1
    out = PREFERENCE_LOSSES["sigmoid"](POLICY, REF, beta=0.5)
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-1)))  # -log sigmoid(1) = 0.3133
    assert out.chosen_rewards.item() == 0.5 and out.rejected_rewards.item() == -0.5
    # cDPO, label smoothing 0.1: 0.9 * 0.3133 + 0.1 * -log sigmoid(-1) = 0.9 * 0.3133 + 0.1 * 1.3133 = 0.4133
    smoothed = PREFERENCE_LOSSES["sigmoid"](POLICY, REF, beta=0.5, label_smoothing=0.1)
    assert smoothed.losses.item() == pytest.approx(0.9 * math.log1p(math.exp(-1)) + 0.1 * math.log1p(math.e))


def test_ipo_by_hand():
    # per-token log-ratios: chosen 1 / 2 = 0.5, rejected -1 / 4 = -0.25 -> h = 0.75; target 1 / (2 * 0.5) = 1
    out = PREFERENCE_LOSSES["ipo"](POLICY, REF, beta=0.5)
    assert out.losses.item() == pytest.approx((0.75 - 1.0) ** 2)


def test_simpo_by_hand_needs_no_reference():
    # beta 2: chosen 2 * -1 / 2 = -1, rejected 2 * -3 / 4 = -1.5; margin 0.5 - gamma 0.5 = 0 -> log 2
    out = PREFERENCE_LOSSES["simpo"](POLICY, None, beta=2.0, gamma=0.5)
    assert out.losses.item() == pytest.approx(math.log(2.0))
    assert out.chosen_rewards.item() == -1.0 and out.rejected_rewards.item() == -1.5


def test_dpo_properties():
    torch.manual_seed(0)
    pol = PairLogps(torch.randn(6), torch.randn(6), torch.full((6,), 3.0), torch.full((6,), 5.0))
    # the policy equal to the reference: every pair costs log 2 and has no margin
    same = PREFERENCE_LOSSES["sigmoid"](pol, pol, beta=0.3)
    assert torch.allclose(same.losses, torch.full((6,), math.log(2.0)))
    # swapping chosen and rejected mirrors the logits: loss(x) + ... sigmoid(x) + sigmoid(-x) = 1
    swapped = PairLogps(pol.rejected, pol.chosen, pol.rejected_len, pol.chosen_len)
    ref = PairLogps(torch.randn(6), torch.randn(6), pol.chosen_len, pol.rejected_len)
    ref_swapped = PairLogps(ref.rejected, ref.chosen, ref.rejected_len, ref.chosen_len)
    a = PREFERENCE_LOSSES["sigmoid"](pol, ref, beta=0.3).losses
    b = PREFERENCE_LOSSES["sigmoid"](swapped, ref_swapped, beta=0.3).losses
    assert torch.allclose(torch.exp(-a) + torch.exp(-b), torch.ones(6), atol=1e-6)
    # the gradient raises the chosen answer's log-prob and lowers the rejected one's
    chosen = torch.zeros(1, requires_grad=True)
    rejected = torch.zeros(1, requires_grad=True)
    PREFERENCE_LOSSES["sigmoid"](PairLogps(chosen, rejected, torch.ones(1), torch.ones(1)), PairLogps(
        torch.zeros(1), torch.zeros(1), torch.ones(1), torch.ones(1)), beta=0.1).losses.sum().backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()


def test_answer_logps_sums_only_answer_tokens():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -7.0]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    s, n = answer_logps(logprobs, mask)
    assert s.tolist() == [-5.0, -1.0] and n.tolist() == [2.0, 2.0]
