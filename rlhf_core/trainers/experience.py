"""Experience for PPO: rollouts scored by the reward model, the frozen reference and the critic.

Every forward here runs without gradients, in the models' own dtype, over a whole generation batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_core.data.formats import PromptFormat, render_prompt
from rlhf_core.engines.hybrid import Rollout, accepts, left_pad, position_ids_from
from rlhf_core.maths.rl import logprobs_from_logits


@dataclass(frozen=True)
class Experience:
    sequences: torch.Tensor  # [B, T] T = P + A
    attention_mask: torch.Tensor  # [B, T]
    response_mask: torch.Tensor  # [B, A] float
    old_logprobs: torch.Tensor  # [B, A] actor log-probs at sampling time
    ref_logprobs: torch.Tensor  # [B, A]
    values: torch.Tensor  # [B, A] critic value of the state before each answer token
    scores: torch.Tensor  # [B] reward-model score after normalising / scaling
    rewards: torch.Tensor  # [B, A] KL-shaped
    kl: torch.Tensor  # [B, A] per-token KL estimate (masked)
    advantages: torch.Tensor  # [B, A]
    returns: torch.Tensor  # [B, A]
    prompt_len: int

    def select(self, idx: torch.Tensor) -> "Experience":
        """Rows ``idx`` of every per-row tensor (a training micro-batch)."""
        fields = {k: (v[idx] if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return Experience(**fields)

    @staticmethod
    def cat(items: list["Experience"]) -> "Experience":
        """Concatenate generation batches (padded to the longest prompt)."""
        P = max(e.prompt_len for e in items)
        fields = {}
        for name in items[0].__dict__:
            if name == "prompt_len":
                fields[name] = P
            elif name in ("sequences", "attention_mask"):
                fields[name] = torch.cat([_pad_prompt(getattr(e, name), P - e.prompt_len, name) for e in items])
            else:
                fields[name] = torch.cat([getattr(e, name) for e in items])
        return Experience(**fields)


def _pad_prompt(x: torch.Tensor, extra: int, name: str) -> torch.Tensor:
    """Left-pad a batch's prompts to a longer P; the filler id is irrelevant, its mask is 0."""
    if extra == 0:
        return x
    return torch.cat([x.new_zeros((x.shape[0], extra)), x], 1)


def model_kwargs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if accepts(model, "position_ids"):
        kwargs["position_ids"] = position_ids_from(attention_mask)
    return kwargs


def sequence_logprobs(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                      temperature: float = 1.0, chunk: int | None = None) -> torch.Tensor:
    """Log-probs of the answer tokens under ``model`` ([B, T] -> [B, A]); logits are divided by the
    sampling temperature so they describe the distribution the answers were drawn from.

    Only the answer positions' logits are computed (``logits_to_keep``), and ``chunk`` rows at a time when
    given (scoring without gradients), so the [rows, A, vocab] logits stay small.
    """
    if chunk and sequences.shape[0] > chunk:
        return torch.cat([sequence_logprobs(model, sequences[i:i + chunk], attention_mask[i:i + chunk], prompt_len,
                                            temperature) for i in range(0, sequences.shape[0], chunk)])
    A = sequences.shape[1] - prompt_len
    kwargs = model_kwargs(model, sequences, attention_mask)
    if accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = A + 1  # positions P-1 .. T-1; the last one predicts past the end
    logits = model(**kwargs, use_cache=False).logits[:, -(A + 1):-1]
    if temperature != 1.0:
        logits = logits / temperature
    return logprobs_from_logits(logits, sequences[:, prompt_len:])


def sequence_values(critic, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                    chunk: int | None = None) -> torch.Tensor:
    """Critic value of the state before each answer token ([B, T] -> [B, A])."""
    if chunk and sequences.shape[0] > chunk:
        return torch.cat([sequence_values(critic, sequences[i:i + chunk], attention_mask[i:i + chunk], prompt_len)
                          for i in range(0, sequences.shape[0], chunk)])
    kwargs = model_kwargs(critic, sequences, attention_mask)
    values = critic(kwargs["input_ids"], kwargs["attention_mask"], kwargs.get("position_ids"))
    return values[:, prompt_len - 1:-1]


class RewardScorer:
    """Scores rollouts with the reward model. With the actor's tokenizer the token ids are reused; with
    another tokenizer, prompt and answer are decoded to text and re-encoded. Either way the model sees
    what it was trained on: prompt + answer (up to its first EOS) + EOS."""

    def __init__(self, reward_model, reward_tokenizer, actor_tokenizer, prompt_format: PromptFormat,
                 max_len: int, device: torch.device):
        self.model, self.rtok, self.atok, self.fmt, self.max_len, self.device = (
            reward_model, reward_tokenizer, actor_tokenizer, prompt_format, max_len, device)
        self.same = same_tokenizer(reward_tokenizer, actor_tokenizer)

    @torch.no_grad()
    def __call__(self, prompts: list[str], rollout: Rollout) -> torch.Tensor:
        """prompts: canonical prompt text per row. Returns raw scores [B] (float32)."""
        rows = self._rows(prompts, rollout)
        rows = [r[-self.max_len:] for r in rows]  # keep the end: the score is read at the last token
        T = max(map(len, rows))
        ids = torch.full((len(rows), T), self.rtok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        kwargs = model_kwargs(self.model, ids, mask)
        from rlhf_core.models.reward_model import sequence_scores

        values = self.model(kwargs["input_ids"], kwargs["attention_mask"], kwargs.get("position_ids"))
        return sequence_scores(values, mask).float()

    def _rows(self, prompts: list[str], rollout: Rollout) -> list[list[int]]:
        answers = [r[m.bool()].tolist() for r, m in zip(rollout.responses.cpu(), rollout.response_mask.cpu())]
        eos = self.atok.eos_token_id
        answers = [a[:-1] if a and a[-1] == eos else a for a in answers]
        end = [self.rtok.eos_token_id] if self.rtok.eos_token_id is not None else []
        if self.same:
            prompt_rows = [row[mask.bool()].tolist() for row, mask in
                           zip(rollout.sequences[:, :rollout.prompt_len].cpu(), rollout.attention_mask[:, :rollout.prompt_len].cpu())]
            return [p + a + end for p, a in zip(prompt_rows, answers)]
        texts = self.atok.batch_decode(answers, skip_special_tokens=True)
        rendered = [render_prompt(p, self.fmt, self.rtok) for p in prompts]
        p_ids = self.rtok(rendered, add_special_tokens=True)["input_ids"]
        a_ids = self.rtok(texts, add_special_tokens=False)["input_ids"]
        return [p + a + end for p, a in zip(p_ids, a_ids)]


def same_tokenizer(a, b) -> bool:
    """Whether token ids mean the same in both tokenizers (then no text round trip is needed)."""
    return (a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id and a.bos_token_id == b.bos_token_id
            and getattr(a, "chat_template", None) == getattr(b, "chat_template", None))


def tokenize_prompts(prompts: list[str], tokenizer, fmt: PromptFormat) -> list[list[int]]:
    return tokenizer([render_prompt(p, fmt, tokenizer) for p in prompts], add_special_tokens=True)["input_ids"]


__all__ = ["Experience", "RewardScorer", "left_pad", "model_kwargs", "sequence_logprobs", "sequence_values",
           "same_tokenizer", "tokenize_prompts"]
