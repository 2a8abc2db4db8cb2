"""Advantage estimators on tiny hand-computed tensors, plus properties: masked positions do not matter, a
batch split between two ranks gives the same advantages, the vectorised forms equal their loops."""

import math

import pytest
import torch

from rlhf_core.maths.advantages import (ADVANTAGE_ESTIMATORS, AdvantageParams, advantage_estimator,
                                        compute_discounted_returns, compute_group_mean_baseline, compute_group_norm,
                                        compute_rloo_baseline)


def test_grpo_group_norm_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    # group 1: mean 2, unbiased std sqrt((1 + 0 + 1) / 2) = 1 -> [-1, 0, 1]; group 2: all equal -> 0
    got = compute_group_norm(scores, 3)
    assert torch.allclose(got, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]), atol=1e-5)
    # Dr.GRPO: no std division; group of 2: [1, 4] -> mean 2.5 -> [-1.5, 1.5]
    assert torch.allclose(compute_group_norm(torch.tensor([1.0, 4.0]), 2, norm_by_std=False), torch.tensor([-1.5, 1.5]))
    assert torch.equal(compute_group_norm(torch.tensor([7.0]), 1), torch.tensor([0.0]))  # one sample: no baseline


def test_grpo_is_invariant_to_shift_and_scale_within_a_group():
    torch.manual_seed(0)
    s = torch.randn(12)
    assert torch.allclose(compute_group_norm(s, 4), compute_group_norm(3.0 * s + 10.0, 4), atol=1e-4)
    # Dr.GRPO keeps the scale (no std division) but not the shift
    assert torch.allclose(compute_group_norm(3.0 * s + 10.0, 4, norm_by_std=False), 3.0 * compute_group_norm(s, 4, norm_by_std=False), atol=1e-4)


def test_rloo_by_hand_and_as_its_loop():
    scores = torch.tensor([1.0, 2.0, 3.0, 0.0, 4.0, 8.0])
    # 1 - (2 + 3) / 2 = -1.5;  2 - (1 + 3) / 2 = 0;  3 - (1 + 2) / 2 = 1.5;  0 - 6 = -6;  4 - 4 = 0;  8 - 2 = 6
    assert torch.allclose(compute_rloo_baseline(scores, 3), torch.tensor([-1.5, 0.0, 1.5, -6.0, 0.0, 6.0]))
    torch.manual_seed(1)
    s, n = torch.randn(20), 5
    loop = torch.tensor([s[i] - sum(s[j] for j in range(i - i % n, i - i % n + n) if j != i) / (n - 1) for i in range(20)])
    assert torch.allclose(compute_rloo_baseline(s, n), loop, atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 samples"):
        compute_rloo_baseline(s, 1)


def test_group_mean_baseline_by_hand():
    assert torch.allclose(compute_group_mean_baseline(torch.tensor([1.0, 2.0, 3.0, 6.0]), 2),
                          torch.tensor([-0.5, 0.5, -1.5, 1.5]))  # [1, 2] mean 1.5; [3, 6] mean 4.5
    assert torch.equal(compute_group_mean_baseline(torch.tensor([1.0, 2.0]), 1), torch.tensor([1.0, 2.0]))


def test_groups_must_divide_the_batch():
    with pytest.raises(ValueError, match="groups of 4"):
        compute_group_norm(torch.zeros(6), 4)


def test_discounted_returns_by_hand_and_nothing_after_the_end():
    # r = [0, -0.1, 1], gamma 0.5: G2 = 1;  G1 = -0.1 + 0.5 * 1 = 0.4;  G0 = 0 + 0.5 * 0.4 = 0.2
    got = compute_discounted_returns(torch.tensor([[0.0, -0.1, 1.0]]), torch.ones(1, 3), 0.5)
    assert torch.allclose(got, torch.tensor([[0.2, 0.4, 1.0]]))
    # a reward after the end (9.0) is ignored: G1 = 1, G0 = 0.5, G2 = 0
    got = compute_discounted_returns(torch.tensor([[0.0, 1.0, 9.0]]), torch.tensor([[1.0, 1.0, 0.0]]), 0.5)
    assert torch.allclose(got, torch.tensor([[0.5, 1.0, 0.0]]))
    torch.manual_seed(2)
    r, g = torch.randn(3, 6), 0.9
    loop = torch.tensor([[sum(g ** (k - t) * r[b, k] for k in range(t, 6)) for t in range(6)] for b in range(3)])
    assert torch.allclose(compute_discounted_returns(r, torch.ones(3, 6), g), loop, atol=1e-5)


def test_grpo_estimator_by_hand():
    logp = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0], [-1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    p = AdvantageParams(kl_coef=0.1, kl_estimator="k1", group_size=2, gamma=1.0)
    out = advantage_estimator("grpo").estimate(torch.tensor([1.0, 3.0]), logp, ref, None, mask, p)
    # scores [1, 3]: mean 2, unbiased std sqrt(2) -> [-1/sqrt2, 1/sqrt2] = [-0.7071, 0.7071]
    # k1 = logp - ref = [[0.5, 0], [0, 0]] -> penalty -0.1 * k1 = [[-0.05, 0], [0, 0]]
    # rewards: row 0 [-0.05, -0.7071] (score on its last token), row 1 [0.7071, 0] (its answer is one token)
    # returns (gamma 1): row 0 [-0.7571, -0.7071], row 1 [0.7071, 0]
    h = 1 / math.sqrt(2)
    assert torch.allclose(out.rewards, torch.tensor([[-0.05, -h], [h, 0.0]]), atol=1e-5)
    assert torch.allclose(out.advantages, torch.tensor([[-0.05 - h, -h], [h, 0.0]]), atol=1e-5)
    assert torch.equal(out.advantages, out.returns)
    assert torch.allclose(out.kl, torch.tensor([[0.5, 0.0], [0.0, 0.0]]))


def test_kl_as_a_loss_leaves_the_rewards_unshaped():
    logp, ref, mask = torch.zeros(2, 3), torch.full((2, 3), -1.0), torch.ones(2, 3)
    out = advantage_estimator("rloo").estimate(torch.tensor([1.0, 2.0]), logp, ref, None, mask,
                                               AdvantageParams(kl_coef=0.0, group_size=2))
    # rloo: [1 - 2, 2 - 1] = [-1, 1] on the last token only; every token's return is the score
    assert torch.allclose(out.advantages, torch.tensor([[-1.0] * 3, [1.0] * 3]))
    assert torch.allclose(out.kl, torch.ones(2, 3))  # still measured (k1 = 0 - (-1))


def test_scores_are_clipped_before_the_baseline():
    p = AdvantageParams(kl_coef=0.0, reward_clip=1.0, group_size=2)
    out = advantage_estimator("reinforce_pp").estimate(torch.tensor([5.0, -5.0]), torch.zeros(2, 1), torch.zeros(2, 1),
                                                       None, torch.ones(2, 1), p)
    assert torch.allclose(out.advantages[:, 0], torch.tensor([1.0, -1.0]))  # clip to [1, -1], mean 0


def test_gae_estimator_is_ppos_and_needs_values():
    from rlhf_core.maths.algos import compute_gae, compute_rewards

    torch.manual_seed(3)
    scores, logp, ref, values = torch.randn(3), torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.float)
    p = AdvantageParams(kl_coef=0.2, kl_estimator="k3", reward_clip=0.5, gamma=0.99, lam=0.9)
    out = advantage_estimator("gae").estimate(scores, logp, ref, values, mask, p)
    rewards, kl = compute_rewards(scores, logp, ref, mask, 0.2, "k3", clip=0.5)
    adv, ret = compute_gae(rewards, values, mask, 0.99, 0.9)
    assert torch.equal(out.rewards, rewards) and torch.equal(out.advantages, adv) and torch.equal(out.returns, ret)
    with pytest.raises(ValueError, match="critic"):
        advantage_estimator("gae").estimate(scores, logp, ref, None, mask, p)


@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_masked_positions_do_not_matter(name):
    torch.manual_seed(4)
    scores, logp, ref, values = torch.randn(4), torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.float)
    p = AdvantageParams(kl_coef=0.1, group_size=2, gamma=0.95)
    est = advantage_estimator(name).estimate
    a = est(scores, logp, ref, values, mask, p)
    logp2, ref2, values2 = logp.clone(), ref.clone(), values.clone()
    logp2[mask == 0], ref2[mask == 0], values2[mask == 0] = 50.0, -50.0, 99.0
    b = est(scores, logp2, ref2, values2, mask, p)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert (a.advantages[mask == 0] == 0).all()


@pytest.mark.parametrize("name", ["grpo", "rloo", "reinforce_pp"])
def test_a_batch_split_between_two_ranks_gives_the_same_advantages(name):
    """Groups are consecutive rows and never span ranks: each half computed alone equals the whole."""
    torch.manual_seed(5)
    scores, logp, ref, mask = torch.randn(8), torch.randn(8, 3), torch.randn(8, 3), torch.ones(8, 3)
    p = AdvantageParams(kl_coef=0.05, group_size=4)
    est = advantage_estimator(name).estimate
    whole = est(scores, logp, ref, None, mask, p).advantages
    halves = torch.cat([est(scores[s], logp[s], ref[s], None, mask[s], p).advantages for s in (slice(0, 4), slice(4, 8))])
    assert torch.allclose(whole, halves)


def test_registry_names_and_critics():
    assert {n: e.uses_critic for n, e in ADVANTAGE_ESTIMATORS.items()} == {
        "gae": True, "grpo": False, "rloo": False, "reinforce_pp": False}
    with pytest.raises(ValueError, match="estimators are gae, grpo"):
        advantage_estimator("vtrace")
