"""The RL maths of step 3, importing only torch: masked statistics, KL estimators, KL-shaped rewards, GAE,
policy losses (a registry by name) and their aggregation, the value loss, the KL controller. Advantage
estimators live in ``advantages.py``, preference losses (DPO) in ``preference.py``.

Vocabulary (STYLE.md): ``logprobs``, ``old_logprobs``, ``ref_logprobs``, ``values``, ``advantages``,
``returns``, ``response_mask``; shapes ``[B, A]`` are per answer token (A = answer length), ``[B]`` per
sequence. ``response_mask`` is 1 on generated tokens up to and including the first EOS, 0 after: nothing
after the end of an answer gets a reward, a value or a loss (the repetition fix DeepSpeed-Chat needed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3"]


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over positions where mask is 1 (all of them, or along ``dim``)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(x - mean) / std over masked positions; ``stats`` (mean, var) lets callers pass statistics reduced
    over several ranks. Masked-out positions come back as 0."""
    mean, var = stats if stats is not None else masked_mean_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def masked_mean_var(x: torch.Tensor, mask: torch.Tensor, across_ranks: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased) variance of ``x`` where ``mask`` is 1; ``across_ranks``: over every rank's
    positions at once (one all-reduce of sum, sum of squares and count, in float64), so that statistics do
    not depend on how rows are spread over processes."""
    xf, mf = x.double(), mask.double()
    stats = torch.stack([(xf * mf).sum(), (xf * xf * mf).sum(), mf.sum()])
    if across_ranks and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(stats)  # host-device sync on CUDA
    s, ss, n = stats
    mean = s / n.clamp(min=1)
    var = (ss / n.clamp(min=1) - mean * mean).clamp(min=0)
    return mean.to(x.dtype), var.to(x.dtype)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) for each position: logits [B, A, V], tokens [B, A] -> [B, A].

    Equals ``log_softmax(logits)[b, a, tokens[b, a]]`` without materialising the log-softmax.
    """
    logits = logits.float()
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def compute_approx_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi ([B, A] -> [B, A]).

    With log r = ref_logprobs - logprobs (http://joschu.net/blog/kl-approx.html):
    k1 = -log r (unbiased, can be negative); k2 = (log r)^2 / 2 (low variance, biased);
    k3 = (r - 1) - log r (unbiased, always >= 0).
    """
    log_ratio = ref_logprobs.float() - logprobs.float()
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1, k2 or k3")


def compute_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                    response_mask: torch.Tensor, kl_coef: float, estimator: KLEstimator = "k1",
                    clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """KL-shaped per-token rewards (InstructGPT eq. 2): r_t = -beta * kl_t, plus the (clipped) reward-model
    score on each answer's last token. Nothing after the end of an answer.

    Args: scores [B]; logprobs, ref_logprobs, response_mask [B, A].
    Returns: rewards [B, A], kl [B, A] (masked).
    """
    kl = compute_approx_kl(logprobs, ref_logprobs, estimator) * response_mask
    rewards = -kl_coef * kl
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    last = last_index(response_mask)
    rewards = rewards.scatter_add(1, last.unsqueeze(1), scores.to(rewards.dtype).unsqueeze(1))
    return rewards * response_mask, kl


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a mask ([B, T] -> [B]); 0 for an empty row. For an attention
    mask, the last real token under left or right padding.

    Equals ``[max((i for i in range(T) if mask[b, i]), default=0) for b in range(B)]``.
    """
    T = mask.shape[1]
    has = mask.sum(1) > 0
    idx = T - 1 - mask.flip(1).to(torch.int64).argmax(1)
    return torch.where(has, idx, torch.zeros_like(idx))


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, gamma: float,
                lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over answer tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, where V and A beyond the
    end of the answer are 0. Args: rewards, values, response_mask [B, A]. Returns: advantages, returns
    [B, A] (returns = advantages + values), both 0 after the end.
    """
    values = values * response_mask
    rewards = rewards * response_mask
    A = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(A)):
        m = response_mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = adv * m
        next_adv = advantages[:, t]
        next_value = values[:, t]
    returns = (advantages + values) * response_mask
    return advantages, returns


# How a [B, A] per-token loss becomes a scalar (veRL's loss_agg_mode names). ``token-mean``: the mean over every
# answer token of the micro-batch (DeepSpeed-Chat, PPO); ``seq-mean-token-mean``: each answer's token mean, then
# the mean over answers (the GRPO paper); ``seq-mean-token-sum-norm``: each answer's token sum over a constant
# (the longest answer allowed), then the mean over answers: Dr.GRPO's length-unbiased form
# (Liu et al. 2025, https://arxiv.org/abs/2503.20783), where a long answer's tokens weigh what a short one's do.
LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def aggregate_loss(loss: torch.Tensor, response_mask: torch.Tensor, agg: LossAgg = "token-mean",
                   max_len: int | None = None) -> torch.Tensor:
    """A per-token loss [B, A] as a scalar, over masked positions only (``LossAgg``); ``max_len`` is the
    constant of ``seq-mean-token-sum-norm`` (default: A, the batch's answer width).

    Equals, for ``seq-mean-token-sum-norm``: ``sum(sum(loss[b, t] for t if mask[b, t]) / max_len for b) / B``.
    """
    if agg == "token-mean":
        return masked_mean(loss, response_mask)
    per_seq = (loss * response_mask).sum(1)
    if agg == "seq-mean-token-mean":
        return (per_seq / response_mask.sum(1).clamp(min=1)).mean()
    if agg == "seq-mean-token-sum-norm":
        return (per_seq / float(max_len or loss.shape[1])).mean()
    raise ValueError(f"unknown loss aggregation {agg!r}; use token-mean, seq-mean-token-mean or seq-mean-token-sum-norm")


def compute_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        response_mask: torch.Tensor, clip_range: float, agg: LossAgg = "token-mean",
                        max_len: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate objective (Schulman et al. 2017, eq. 7) with a per-token ratio, aggregated by ``agg``
    (token-mean over the answer by default).

    Returns the loss and metrics: clipfrac (share of tokens where clipping bound) and approx_kl between
    the new and old policy (k3).
    """
    log_ratio = logprobs - old_logprobs
    return _clipped_surrogate(torch.exp(log_ratio), log_ratio, advantages, response_mask, clip_range, agg, max_len)


def compute_gspo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      response_mask: torch.Tensor, clip_range: float, agg: LossAgg = "token-mean",
                      max_len: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO (Zheng et al. 2025, https://arxiv.org/abs/2507.18071): the clipped surrogate with one ratio per
    answer, the geometric mean of its token ratios, s_b = exp(mean_t(logprobs - old_logprobs)), clipped as a
    whole. In its token form each token's ratio has the value s_b and the gradient s_b * grad log pi(token),
    so per-token advantages still apply. Its clip range is small (the paper: 3e-4 / 4e-4)."""
    seq_log_ratio = masked_mean(logprobs - old_logprobs, response_mask, dim=1)  # [B]
    log_ratio = seq_log_ratio.detach().unsqueeze(1) + logprobs - logprobs.detach()  # value: seq; gradient: token
    return _clipped_surrogate(torch.exp(log_ratio), seq_log_ratio.unsqueeze(1).expand_as(logprobs), advantages,
                              response_mask, clip_range, agg, max_len)


def _clipped_surrogate(ratio: torch.Tensor, log_ratio: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor,
                       clip_range: float, agg: LossAgg, max_len: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    policy_loss = aggregate_loss(torch.maximum(unclipped, clipped), response_mask, agg, max_len)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), response_mask)
        approx_kl = masked_mean(torch.expm1(-log_ratio) + log_ratio, response_mask)
    return policy_loss, {"clipfrac": clipfrac, "approx_kl": approx_kl}


# Policy losses by name (``rl.policy_loss``): (logprobs, old_logprobs, advantages, response_mask, clip_range, agg,
# max_len) -> (loss, {"clipfrac", "approx_kl"}).
POLICY_LOSSES = {"ppo_clip": compute_policy_loss, "gspo": compute_gspo_loss}


def compute_kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, response_mask: torch.Tensor,
                    estimator: KLEstimator = "k3", agg: LossAgg = "token-mean", max_len: int | None = None) -> torch.Tensor:
    """KL(pi || pi_ref) as a loss term instead of a reward penalty (GRPO, Shao et al. 2024, eq. 4: k3 on the
    current policy's log-probs, so its gradient pulls towards the reference), aggregated like the policy loss."""
    return aggregate_loss(compute_approx_kl(logprobs, ref_logprobs, estimator), response_mask, agg, max_len)


def compute_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       response_mask: torch.Tensor, clip_range: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clip(V - V_old, +-eps)."""
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
    loss = 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped_values - returns) ** 2), response_mask)
    with torch.no_grad():
        clipfrac = masked_mean(((values - old_values).abs() > clip_range).float(), response_mask)
    return loss, {"value_clipfrac": clipfrac}


# ---------------------------------------------------------------------------------------- KL controllers


@dataclass
class KLController:
    """The KL coefficient beta: fixed, or adapted towards a target KL (Ziegler et al. 2019, sec. 2.2):
    beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon)."""

    value: float
    adaptive: bool = False
    target: float = 6.0
    horizon: int = 10000

    def update(self, current_kl: float, n_steps: int) -> None:
        if not self.adaptive:
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        if not math.isfinite(self.value):
            raise FloatingPointError(f"KL coefficient became {self.value}")

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
