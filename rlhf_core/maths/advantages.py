"""Advantage estimators, importing only torch: how each algorithm turns an answer's score and the per-token
KL into per-token advantages (veRL's ``core_algos`` registry, in the vocabulary of ``algos.py``).

Every estimator takes the same inputs and returns the same outputs (``Advantages``), so the experience maker
calls one by name (``ADVANTAGE_ESTIMATORS``)::

    gae           PPO: KL-shaped rewards, a critic's values, GAE (Schulman et al. 2016)
    grpo          GRPO: scores normalised within each prompt's group, (r - mean) / std (Shao et al. 2024);
                  without the std division, Dr.GRPO (Liu et al. 2025)
    rloo          RLOO: each score minus the mean of the other samples of its prompt (Ahmadian et al. 2024)
    reinforce_pp  REINFORCE++: the score as it is (minus its group's mean when there are several samples per
                  prompt, REINFORCE++-baseline), normalised over the whole batch afterwards (Hu 2025)

Groups: ``n`` samples of one prompt are ``n`` consecutive rows (the trainer repeats each prompt ``n`` times),
so a group never spans two generation batches or two ranks. The critic-free estimators then follow
OpenRLHF: the baselined score goes on each answer's last token, the KL penalty (if it is a reward penalty)
on every token, and the advantage of a token is the (discounted) sum of the rewards from it to the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from rlhf_core.maths.algos import KLEstimator, compute_gae, compute_rewards


@dataclass(frozen=True)
class AdvantageParams:
    kl_coef: float  # the KL penalty per token in the rewards (0 when KL is a loss term instead)
    kl_estimator: KLEstimator = "k1"
    reward_clip: float | None = None  # scores are clipped to [-x, x] before any baseline
    gamma: float = 1.0
    lam: float = 0.95  # GAE only
    group_size: int = 1  # samples per prompt: consecutive rows
    norm_by_std: bool = True  # GRPO only; False is Dr.GRPO
    eps: float = 1e-6


class Advantages(NamedTuple):
    rewards: torch.Tensor  # [B, A] per-token rewards: KL penalty on every token, the (baselined) score on the last
    kl: torch.Tensor  # [B, A] per-token KL estimate (masked)
    advantages: torch.Tensor  # [B, A]
    returns: torch.Tensor  # [B, A] (the critic's targets under GAE)


# ------------------------------------------------------------------------------------------ group baselines


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B] -> [B / n, n]: each row one prompt's samples."""
    if scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} scores do not split into groups of {group_size} samples per prompt")
    return scores.reshape(-1, group_size)


def compute_group_norm(scores: torch.Tensor, group_size: int, norm_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's outcome advantage: (r - mean(group)) / (std(group) + eps), std unbiased as in veRL and OpenRLHF;
    ``norm_by_std=False`` leaves out the division (Dr.GRPO). [B] -> [B]; a group of one gets 0 (no baseline)."""
    g = _groups(scores.float(), group_size)
    centred = g - g.mean(1, keepdim=True)
    if norm_by_std and group_size > 1:
        centred = centred / (g.std(1, keepdim=True) + eps)
    return centred.reshape(-1)


def compute_rloo_baseline(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: r_i - mean_{j != i} r_j within each group, = (r_i - mean) * n / (n - 1). [B] -> [B]."""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt (rl.n_samples_per_prompt)")
    g = _groups(scores.float(), group_size)
    return (g - (g.sum(1, keepdim=True) - g) / (group_size - 1)).reshape(-1)


def compute_group_mean_baseline(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE++-baseline: r_i - mean(group). [B] -> [B]; with one sample per prompt, r as it is."""
    if group_size == 1:
        return scores.float()
    g = _groups(scores.float(), group_size)
    return (g - g.mean(1, keepdim=True)).reshape(-1)


def compute_discounted_returns(rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma * G_{t+1} over each answer, 0 after its end ([B, A] -> [B, A]).

    Equals ``[[sum(gamma**(k - t) * r[b, k] for k in range(t, A) if mask[b, k]) ...]]`` for masked t.
    """
    rewards = rewards * response_mask
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        out[:, t] = running
    return out * response_mask


# ------------------------------------------------------------------------------------------- estimators


def estimate_gae(scores, logprobs, ref_logprobs, values, response_mask, p: AdvantageParams) -> Advantages:
    """PPO: r_t = -beta * kl_t plus the clipped score on the last token; GAE over the critic's values."""
    if values is None:
        raise ValueError("GAE needs the critic's values")
    rewards, kl = compute_rewards(scores, logprobs, ref_logprobs, response_mask, p.kl_coef, p.kl_estimator,
                                  clip=p.reward_clip)
    advantages, returns = compute_gae(rewards, values, response_mask, p.gamma, p.lam)
    return Advantages(rewards, kl, advantages, returns)


def _outcome(baseline: Callable[[torch.Tensor, AdvantageParams], torch.Tensor]):
    """A critic-free estimator: clip the score, subtract the group baseline, shape with the KL penalty,
    advantages = discounted returns of the shaped rewards."""

    def estimate(scores, logprobs, ref_logprobs, values, response_mask, p: AdvantageParams) -> Advantages:
        if p.reward_clip is not None:
            scores = scores.clamp(-p.reward_clip, p.reward_clip)
        rewards, kl = compute_rewards(baseline(scores, p), logprobs, ref_logprobs, response_mask, p.kl_coef,
                                      p.kl_estimator)
        returns = compute_discounted_returns(rewards, response_mask, p.gamma)
        return Advantages(rewards, kl, returns, returns)

    estimate.__doc__ = baseline.__doc__
    return estimate


def _grpo(scores, p):
    """GRPO: scores normalised within each prompt's group (Dr.GRPO without the std division)."""
    return compute_group_norm(scores, p.group_size, p.norm_by_std, p.eps)


def _rloo(scores, p):
    """RLOO: each score minus its group's leave-one-out mean."""
    return compute_rloo_baseline(scores, p.group_size)


def _reinforce_pp(scores, p):
    """REINFORCE++: the score (minus its group's mean with several samples per prompt); the trainer then
    normalises the advantages over the whole batch."""
    return compute_group_mean_baseline(scores, p.group_size)


@dataclass(frozen=True)
class AdvantageEstimator:
    estimate: Callable[..., Advantages]  # (scores [B], logprobs, ref_logprobs, values | None, response_mask, params)
    uses_critic: bool
    whiten: bool  # the default of normalising advantages over the global batch afterwards (rl.whiten_advantages)


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "gae": AdvantageEstimator(estimate_gae, uses_critic=True, whiten=True),
    "grpo": AdvantageEstimator(_outcome(_grpo), uses_critic=False, whiten=False),
    "rloo": AdvantageEstimator(_outcome(_rloo), uses_critic=False, whiten=False),
    "reinforce_pp": AdvantageEstimator(_outcome(_reinforce_pp), uses_critic=False, whiten=True),
}


def advantage_estimator(name: str) -> AdvantageEstimator:
    try:
        return ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown advantage estimator {name!r}; estimators are {', '.join(ADVANTAGE_ESTIMATORS)}") from None
