"""Offline preference losses (DPO and its relatives), importing only torch: a registry by name
(``rl.dpo.loss_type``) over one pair of answers per prompt.

Inputs are each answer's summed log-probability under the policy and under the frozen reference (the SFT
model), and its length in tokens. Every loss returns the per-pair losses and the implicit rewards of the
chosen and rejected answers (their difference is the margin; chosen > rejected is the preference accuracy):

    sigmoid   DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * (log-ratio chosen - log-ratio rejected)),
              where log-ratio = log pi(y|x) - log pi_ref(y|x); label_smoothing eps gives conservative DPO
              (cDPO: the label is wrong with probability eps)
    ipo       IPO (Azar et al. 2023, eq. 17): (h - 1 / (2 * beta))^2 on per-token mean log-ratios (as TRL)
    simpo     SimPO (Meng et al. 2024, eq. 6): no reference; -log sigmoid(beta * (mean log-prob chosen -
              mean log-prob rejected) - gamma)
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F


class PairLogps(NamedTuple):
    chosen: torch.Tensor  # [B] summed log-probs of the chosen answer's tokens
    rejected: torch.Tensor  # [B]
    chosen_len: torch.Tensor  # [B] answer tokens (float)
    rejected_len: torch.Tensor  # [B]


class PreferenceLoss(NamedTuple):
    losses: torch.Tensor  # [B]
    chosen_rewards: torch.Tensor  # [B] implicit reward of the chosen answer (no gradient)
    rejected_rewards: torch.Tensor  # [B]


def _logsigmoid_smoothed(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def compute_dpo_loss(policy: PairLogps, ref: PairLogps | None, beta: float, label_smoothing: float = 0.0,
                     gamma: float = 0.0) -> PreferenceLoss:
    """DPO (``sigmoid``); ``label_smoothing`` > 0 is cDPO. ``gamma`` is unused."""
    chosen = policy.chosen - ref.chosen
    rejected = policy.rejected - ref.rejected
    losses = _logsigmoid_smoothed(beta * (chosen - rejected), label_smoothing)
    return PreferenceLoss(losses, beta * chosen.detach(), beta * rejected.detach())


def compute_ipo_loss(policy: PairLogps, ref: PairLogps | None, beta: float, label_smoothing: float = 0.0,
                     gamma: float = 0.0) -> PreferenceLoss:
    """IPO: squared distance of the per-token mean log-ratio margin from 1 / (2 beta)."""
    chosen = (policy.chosen - ref.chosen) / policy.chosen_len.clamp(min=1)
    rejected = (policy.rejected - ref.rejected) / policy.rejected_len.clamp(min=1)
    losses = (chosen - rejected - 1.0 / (2.0 * beta)) ** 2
    return PreferenceLoss(losses, beta * chosen.detach(), beta * rejected.detach())


def compute_simpo_loss(policy: PairLogps, ref: PairLogps | None, beta: float, label_smoothing: float = 0.0,
                       gamma: float = 0.5) -> PreferenceLoss:
    """SimPO: length-normalised log-probs, a target margin ``gamma``, no reference (``ref`` is ignored)."""
    chosen = beta * policy.chosen / policy.chosen_len.clamp(min=1)
    rejected = beta * policy.rejected / policy.rejected_len.clamp(min=1)
    losses = _logsigmoid_smoothed(chosen - rejected - gamma, label_smoothing)
    return PreferenceLoss(losses, chosen.detach(), rejected.detach())


PREFERENCE_LOSSES: dict[str, Callable[..., PreferenceLoss]] = {
    "sigmoid": compute_dpo_loss, "ipo": compute_ipo_loss, "simpo": compute_simpo_loss}
NEEDS_REFERENCE = {"sigmoid": True, "ipo": True, "simpo": False}


def answer_logps(logprobs: torch.Tensor, answer_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each row's answer tokens and their count: logprobs, answer_mask [B, T] -> [B], [B]."""
    mask = answer_mask.to(logprobs.dtype)
    return (logprobs * mask).sum(1), mask.sum(1)
