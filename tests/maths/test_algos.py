"""PPO maths on tiny hand-computed tensors, plus properties (masking, vectorised == loop, EMA limits)."""

import math

import pytest
import torch

from rlhf_core.maths.algos import (KLController, compute_approx_kl, compute_gae, compute_policy_loss, compute_rewards,
                                compute_value_loss, last_index, logprobs_from_logits, masked_mean, masked_whiten)


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    # log r = ref - logp = [-0.5, 1.0]
    assert torch.allclose(compute_approx_kl(logp, ref, "k1"), torch.tensor([[0.5, -1.0]]))
    assert torch.allclose(compute_approx_kl(logp, ref, "k2"), torch.tensor([[0.125, 0.5]]))
    k3 = torch.tensor([[math.exp(-0.5) - 1 + 0.5, math.e - 1 - 1.0]])
    assert torch.allclose(compute_approx_kl(logp, ref, "k3"), k3)
    assert (compute_approx_kl(torch.randn(4, 5), torch.randn(4, 5), "k3") >= 0).all()


def test_kl_estimators_are_unbiased_where_claimed():
    """Sampling from p, k1 and k3 average to the true KL(p||q)."""
    torch.manual_seed(0)
    p, q = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.2, 0.5, 0.3])
    true_kl = (p * (p / q).log()).sum()
    x = torch.multinomial(p, 200000, replacement=True)
    logp, logq = p.log()[x][None], q.log()[x][None]
    for est in ("k1", "k3"):
        assert compute_approx_kl(logp, logq, est).mean() == pytest.approx(true_kl.item(), abs=0.01)


def test_rewards_put_score_on_last_answer_token_and_nothing_after():
    scores = torch.tensor([2.0, -1.0])
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -2.0], [-0.5, -3.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    rewards, kl = compute_rewards(scores, logp, ref, mask, kl_coef=0.1, estimator="k1")
    # k1 = logp - ref: row0 [0.5, 0, (1.0 masked)], row1 [-0.5, 2.0, 0]; score at index 1 and 2.
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, 0.0], [-0.5, 2.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 2.0, 0.0], [0.05, -0.2, -1.0]]))
    clipped, _ = compute_rewards(torch.tensor([9.0, -9.0]), logp, ref, mask, 0.0, clip=5.0)
    assert clipped[0, 1] == 5.0 and clipped[1, 2] == -5.0


def test_last_index():
    assert last_index(torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])).tolist() == [1, 2, 0]


def test_gae_by_hand():
    # One answer of 2 tokens: r = [0, 1], V = [0.5, 0.8], gamma = 1, lam = 0.5
    # delta_1 = 1 - 0.8 = 0.2;  A_1 = 0.2
    # delta_0 = 0 + 0.8 - 0.5 = 0.3;  A_0 = 0.3 + 0.5 * 0.2 = 0.4
    adv, ret = compute_gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.8]]), torch.ones(1, 2), 1.0, 0.5)
    assert torch.allclose(adv, torch.tensor([[0.4, 0.2]]))
    assert torch.allclose(ret, torch.tensor([[0.9, 1.0]]))


def test_gae_ignores_everything_after_the_answer():
    torch.manual_seed(0)
    r, v = torch.randn(3, 6), torch.randn(3, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], dtype=torch.float)
    adv, ret = compute_gae(r, v, mask, 0.99, 0.95)
    r2, v2 = r.clone(), v.clone()
    r2[mask == 0] = 100.0  # garbage after the end changes nothing
    v2[mask == 0] = -100.0
    adv2, ret2 = compute_gae(r2, v2, mask, 0.99, 0.95)
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)
    assert (adv[mask == 0] == 0).all()


def test_gae_with_lambda_one_is_discounted_return_minus_value():
    torch.manual_seed(1)
    r, v, mask = torch.randn(2, 5), torch.randn(2, 5), torch.ones(2, 5)
    adv, ret = compute_gae(r, v, mask, gamma=0.9, lam=1.0)
    discounted = torch.stack([sum(0.9 ** (k - t) * r[:, k] for k in range(t, 5)) for t in range(5)], 1)
    assert torch.allclose(ret, discounted, atol=1e-5) and torch.allclose(adv, discounted - v, atol=1e-5)


def test_policy_loss_clips():
    old = torch.zeros(1, 2)
    adv = torch.tensor([[1.0, -1.0]])
    logp = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    loss, m = compute_policy_loss(logp, old, adv, torch.ones(1, 2), clip_range=0.2)
    # token 0: max(-1.5, -1.2) = -1.2;  token 1: max(0.5, 0.8) = 0.8;  mean = -0.2
    assert loss.item() == pytest.approx(-0.2)
    assert m["clipfrac"].item() == 1.0
    same, m0 = compute_policy_loss(old, old, adv, torch.ones(1, 2), 0.2)
    assert m0["clipfrac"].item() == 0.0 and m0["approx_kl"].item() == 0.0 and same.item() == 0.0


def test_value_loss_clips_around_old_values():
    loss, m = compute_value_loss(torch.tensor([[2.0]]), torch.tensor([[0.0]]), torch.tensor([[2.0]]),
                                 torch.ones(1, 1), clip_range=0.5)
    # unclipped error 0, clipped value 0.5 -> error 2.25; max -> 2.25, times 0.5
    assert loss.item() == pytest.approx(1.125) and m["value_clipfrac"].item() == 1.0


def test_losses_ignore_masked_positions():
    torch.manual_seed(2)
    logp, old, adv = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.float)
    a, _ = compute_policy_loss(logp, old, adv, mask, 0.2)
    logp[mask == 0] = 50.0
    b, _ = compute_policy_loss(logp, old, adv, mask, 0.2)
    assert a == b


def test_logprobs_from_logits_equals_log_softmax_gather():
    torch.manual_seed(3)
    logits, tokens = torch.randn(2, 3, 7), torch.randint(0, 7, (2, 3))
    ref = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    assert torch.allclose(logprobs_from_logits(logits, tokens), ref, atol=1e-6)


def test_whitening():
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = masked_whiten(x, mask)
    assert masked_mean(w, mask).abs() < 1e-6 and w[0, 3] == 0
    assert masked_mean(w**2, mask).item() == pytest.approx(1.0, abs=1e-4)


def test_kl_controller():
    fixed = KLController(0.1)
    fixed.update(100.0, 10)
    assert fixed.value == 0.1
    c = KLController(0.1, adaptive=True, target=6.0, horizon=100)
    c.update(12.0, 10)  # error clipped to +0.2 -> 0.1 * (1 + 0.2 * 0.1)
    assert c.value == pytest.approx(0.102)
    c.update(0.0, 10)  # error -0.2
    assert c.value == pytest.approx(0.102 * 0.98)
    d = KLController(0.0, adaptive=True)
    d.load_state_dict(c.state_dict())
    assert d.value == c.value


def test_ema_limits():
    from rlhf_core.trainers.ema import EMA

    torch.manual_seed(4)
    model = torch.nn.Linear(3, 2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    keep = EMA(model, beta=1.0, zero3=False, is_main=True)
    follow = EMA(model, beta=0.0, zero3=False, is_main=True)
    half = EMA(model, beta=0.5, zero3=False, is_main=True)
    with torch.no_grad():
        model.weight.add_(1.0)
    for ema in (keep, follow, half):
        ema.update(model)
    assert torch.equal(keep.shadow["weight"], start["weight"])  # beta 1: never moves
    assert torch.equal(follow.shadow["weight"], model.weight)  # beta 0: equals the weights
    assert torch.allclose(half.shadow["weight"], start["weight"] + 0.5)


def test_loss_aggregation_by_hand():
    from rlhf_core.maths.algos import aggregate_loss

    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate_loss(loss, mask, "token-mean").item() == pytest.approx(2.5)  # (1 + 2 + 3 + 4) / 4
    assert aggregate_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx(3.0)  # (6 / 3 + 4 / 1) / 2
    # Dr.GRPO: (6 / 4 + 4 / 4) / 2 with the constant 4 (the longest answer allowed)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum-norm", max_len=4).item() == pytest.approx(1.25)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate_loss(loss, mask, "sum")


def test_length_unbiased_aggregation_weighs_every_token_alike():
    """token sum / constant: a token of a long answer moves the loss as much as a token of a short one."""
    from rlhf_core.maths.algos import aggregate_loss

    mask = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    for agg, same in (("seq-mean-token-sum-norm", True), ("seq-mean-token-mean", False)):
        loss = torch.zeros(2, 4, requires_grad=True)
        aggregate_loss(loss, mask, agg, max_len=4).backward()
        assert bool(loss.grad[0, 0] == loss.grad[1, 0]) is same, agg


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_aggregated_losses_ignore_masked_positions(agg):
    from rlhf_core.maths.algos import POLICY_LOSSES, compute_kl_loss

    torch.manual_seed(5)
    logp, old, ref, adv = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.float)
    before = [f(logp, old, adv, mask, 0.2, agg, 4)[0] for f in POLICY_LOSSES.values()] + [compute_kl_loss(logp, ref, mask, "k3", agg, 4)]
    logp[mask == 0], ref[mask == 0] = 50.0, -50.0
    after = [f(logp, old, adv, mask, 0.2, agg, 4)[0] for f in POLICY_LOSSES.values()] + [compute_kl_loss(logp, ref, mask, "k3", agg, 4)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_gspo_uses_one_clipped_ratio_per_answer():
    from rlhf_core.maths.algos import compute_gspo_loss

    # token log-ratios [ln 2, 0] -> sequence ratio exp(ln 2 / 2) = sqrt 2 = 1.414 for both tokens; A = 1
    logp = torch.tensor([[math.log(2.0), 0.0]], requires_grad=True)
    loss, m = compute_gspo_loss(logp, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), clip_range=0.2)
    assert loss.item() == pytest.approx(-1.2) and m["clipfrac"].item() == 1.0  # max(-1.414, -1.2) per token
    loose = logp.detach().clone().requires_grad_(True)
    loss, _ = compute_gspo_loss(loose, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), clip_range=10.0)
    assert loss.item() == pytest.approx(-math.sqrt(2.0))
    loss.backward()  # token form: d/dlogp_t of -A * ratio_t / 2 tokens = -sqrt 2 / 2 for each token
    assert torch.allclose(loose.grad, torch.full((1, 2), -math.sqrt(2.0) / 2))


def test_kl_loss_by_hand():
    from rlhf_core.maths.algos import compute_kl_loss

    # log r = ref - logp = [-0.5, 1.0]; k3 = e^-0.5 - 1 + 0.5 = 0.1065, e - 1 - 1 = 0.7183; mean 0.4124
    got = compute_kl_loss(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]]), torch.ones(1, 2), "k3")
    assert got.item() == pytest.approx((math.exp(-0.5) - 0.5 + math.e - 2.0) / 2)
