"""Step 3's experience maker, beside the trainer (OpenRLHF's layout): the models a step runs, and rollouts
turned into experience: old and reference log-probs, critic values (PPO only), scores (reward model and/or a
rule-based function), KL-shaped rewards, and the advantages and returns of the algorithm's estimator
(``rlhf_core.maths.advantages``).

Every forward here runs without gradients, in the models' own dtype, over a whole generation batch.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from rlhf_core.config import DeepSpeedConfig, EMAConfig, RLConfig
from rlhf_core.config.schema import PromptFormat
from rlhf_core.config.views import RLSettings
from rlhf_core.data.formats import render_prompt
from rlhf_core.engines.hybrid import Rollout, accepts, position_ids_from
from rlhf_core.engines.training import build_ds_config, frozen_config, frozen_engine, initialize
from rlhf_core.maths.advantages import AdvantageParams, advantage_estimator
from rlhf_core.maths.algos import logprobs_from_logits
from rlhf_core.models.causal_lm import load_causal_lm
from rlhf_core.models.loading import torch_dtype
from rlhf_core.models.lora import for_training
from rlhf_core.models.reward_function import RewardFunction
from rlhf_core.models.reward_model import RewardMeta, load_reward_model, reward_meta, sequence_scores
from rlhf_core.models.tokenizers import load_saved_tokenizer, same_tokenizer
from rlhf_core.stages.context import StageContext
from rlhf_core.stages.registry import MODEL, REWARD, SFT
from rlhf_core.trainers.ema import EMA
from rlhf_core.trainers.metrics import Timer


@dataclass(frozen=True)
class Experience:
    sequences: torch.Tensor  # [B, T] T = P + A
    attention_mask: torch.Tensor  # [B, T]
    response_mask: torch.Tensor  # [B, A] float
    old_logprobs: torch.Tensor  # [B, A] actor log-probs at sampling time
    ref_logprobs: torch.Tensor  # [B, A]
    values: torch.Tensor | None  # [B, A] critic value of the state before each answer token (PPO; None without a critic)
    scores: torch.Tensor  # [B] the answer's score as the advantages use it (normalised, weighted, scaled)
    rewards: torch.Tensor  # [B, A] KL-shaped
    kl: torch.Tensor  # [B, A] per-token KL estimate (masked)
    advantages: torch.Tensor  # [B, A]
    returns: torch.Tensor  # [B, A]
    prompt_len: int

    def select(self, idx: torch.Tensor) -> "Experience":
        """Rows ``idx`` of every per-row tensor (a training micro-batch)."""
        fields = {k: (v[idx] if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}  # None stays
        return Experience(**fields)

    @staticmethod
    def cat(items: list["Experience"]) -> "Experience":
        """Concatenate generation batches (padded to the longest prompt)."""
        P = max(e.prompt_len for e in items)
        fields = {}
        for name in items[0].__dict__:
            if name == "prompt_len":
                fields[name] = P
            elif getattr(items[0], name) is None:  # values without a critic
                fields[name] = None
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


def tokenize_prompts(prompts: list[str], tokenizer, fmt: PromptFormat) -> list[list[int]]:
    return tokenizer([render_prompt(p, fmt, tokenizer) for p in prompts], add_special_tokens=True)["input_ids"]


def answer_texts(rollout: Rollout, tokenizer) -> list[str]:
    """Each answer's text, up to and including its end (special tokens, EOS among them, left out)."""
    answers = [r[m.bool()].tolist() for r, m in zip(rollout.responses.cpu(), rollout.response_mask.cpu())]
    return [t.strip() for t in tokenizer.batch_decode(answers, skip_special_tokens=True)]


def gold_function(spec: str | None) -> RewardFunction | None:
    """The programmatic gold reward of ``eval.gold_reward`` (a rule-based reward function), or None."""
    return RewardFunction(spec, "eval.gold_reward") if spec else None


# ------------------------------------------------------------------------------------------------ models


@dataclass
class Models:
    """Everything step 3 runs: the trained actor (and PPO's critic), the frozen reference (and reward model, when
    answers are scored by one), the EMA, the tokenizers."""

    actor: Any  # DeepSpeed engine
    critic: Any | None  # DeepSpeed engine (PPO); None for the critic-free algorithms
    ref: torch.nn.Module  # the frozen SFT model, or the actor with its adapters off (``AdaptersOff``)
    reward: torch.nn.Module | None  # None when a rule-based reward alone scores the answers
    ema: EMA | None
    actor_tok: Any
    reward_tok: Any | None
    reward_meta: RewardMeta | None
    ref_offloaded: bool = False  # moved whole to the accelerator per phase (not when ZeRO-3 partitions it)
    reward_offloaded: bool = False


def build_models(ctx: StageContext, total_updates: int) -> Models:
    """The actor engine (from the SFT output), PPO's critic engine (from the reward output), the frozen
    reference, the frozen reward model when it scores answers, the EMA of the actor, and the tokenizers. The
    critic-free algorithms build no critic: no engine, no optimizer state, no memory."""
    settings: RLSettings = ctx.settings
    rl, dist = settings.rl, ctx.dist
    sft_path = ctx.fetch(SFT, MODEL)
    reward_path = ctx.fetch(REWARD, MODEL) if settings.reads_reward_output else None
    actor_tok = load_saved_tokenizer(sft_path, padding_side="left")
    micro = rl.train_micro_batch_size

    # Under ZeRO-3 every model is partitioned across the ranks as it loads, so no rank holds a whole copy.
    actor_ds = build_ds_config(rl.actor.deepspeed, rl.actor.optimizer, micro, 1, dist.world_size)
    actor = for_training(load_causal_lm(sft_path, dropout=rl.actor.dropout, what="the SFT actor",
                                        partition_with=actor_ds), rl.actor.lora, rl.actor.gradient_checkpointing)
    actor_engine = initialize(actor, actor_ds, rl.actor.optimizer, total_updates)

    critic_engine = None
    if rl.uses_critic:
        critic_ds = build_ds_config(rl.critic.deepspeed, rl.critic.optimizer, micro, 1, dist.world_size)
        critic = for_training(load_reward_model(reward_path, dropout=rl.critic.dropout, partition_with=critic_ds),
                              rl.critic.lora, rl.critic.gradient_checkpointing)
        critic_engine = initialize(critic, critic_ds, rl.critic.optimizer, total_updates)

    shared = shares_reference(rl.actor.lora)
    scoring = settings.scores_with_reward_model
    reward_bytes = 0
    if scoring:  # the reward model has the critic's shape; without a critic, count its saved weights
        reward_bytes = (param_bytes(critic_engine.module, rl.critic) if critic_engine is not None else
                        saved_param_bytes(reward_path, rl.critic))
    offload = placement(rl, dist.device, {"reference": 0 if shared else param_bytes(actor_engine.module, rl.actor),
                                          "reward": reward_bytes},
                        reserve=generation_reserve(actor_engine.module, rl), log=ctx.log)
    ref, ref_offloaded = build_reference(sft_path, rl, actor_engine, offload["reference"], dist)
    reward, reward_offloaded, reward_tok, meta = None, False, None, None
    if scoring:
        reward, reward_offloaded = frozen_model(
            lambda dtype, ds: load_reward_model(reward_path, dtype=dtype, dropout=0.0, partition_with=ds),
            rl.critic.deepspeed, offload["reward"], micro, dist)
        reward_tok, meta = load_saved_tokenizer(reward_path, padding_side="right"), reward_meta(reward_path)
    elif reward_path is not None:  # PPO with a rule-based reward alone: the critic's tokenizer and metadata
        reward_tok, meta = load_saved_tokenizer(reward_path, padding_side="right"), reward_meta(reward_path)
    ema = build_ema(settings.ema, actor_engine, ctx.is_main)
    return Models(actor_engine, critic_engine, ref, reward, ema, actor_tok, reward_tok, meta, ref_offloaded,
                  reward_offloaded)


def build_ema(cfg: EMAConfig, actor_engine, is_main: bool) -> EMA | None:
    """The EMA of the actor engine's weights (``ema.enabled``), on rank 0."""
    if not cfg.enabled:
        return None
    return EMA(actor_engine.module, cfg.beta, actor_engine.zero_optimization_stage() == 3, is_main, on_cpu=cfg.on_cpu)


def build_reference(sft_path: str, rl: RLConfig, actor_engine, offload: bool, dist) -> tuple[torch.nn.Module, bool]:
    """The frozen SFT model the actor started from: the actor with its adapters off (LoRA with frozen base
    weights: no second copy), or a frozen copy set up like the actor (``frozen_model``)."""
    if shares_reference(rl.actor.lora):
        return AdaptersOff(actor_engine), False
    return frozen_model(
        lambda dtype, ds: load_causal_lm(sft_path, dtype=dtype, dropout=0.0, what="the reference (SFT) model",
                                         partition_with=ds),
        rl.actor.deepspeed, offload, rl.train_micro_batch_size, dist)


def frozen_model(load: Callable[[torch.dtype, dict | None], torch.nn.Module], trainee: DeepSpeedConfig, offload: bool,
            micro: int, dist) -> tuple[torch.nn.Module, bool]:
    """A frozen model (reference, reward) set up like its trainee (actor, critic): beside a ZeRO-3 trainee a
    ZeRO-3 inference engine, partitioned as it loads (``offload`` keeps the partitions in host memory); else a
    whole copy on the accelerator, or in host memory between phases when ``offload``. Returns the model and
    whether ``on_device`` must move it."""
    dtype = torch_dtype(trainee.precision)
    if trainee.zero_stage == 3:
        ds = frozen_config(trainee.precision, offload, micro, dist.world_size)
        return frozen_engine(load(dtype, ds), ds), False
    model = load(dtype, None).requires_grad_(False).eval()
    return model.to("cpu" if offload else dist.device), offload


class AdaptersOff(torch.nn.Module):
    """The LoRA actor with its adapters switched off: the model it started from, i.e. the reference (its
    base weights are frozen and LoRA's B starts at zero), computed through the actor's own engine, so ZeRO-3
    gathers as usual and no second copy of the weights exists. ``module`` is the actor's (peft) model, so
    that ``accepts`` sees the real signature."""

    def __init__(self, engine):
        super().__init__()
        self._engine = [engine]  # a list: not registered as a submodule, its parameters stay the actor's

    @property
    def module(self) -> torch.nn.Module:
        return self._engine[0].module

    def forward(self, **kwargs):
        engine = self._engine[0]
        with engine.module.disable_adapter():
            return engine(**kwargs)


def shares_reference(lora) -> bool:
    """Whether the reference can be the actor with its adapters off: LoRA with the base weights frozen."""
    return lora.enabled and lora.only_optimize_lora


def param_bytes(module: torch.nn.Module, trainee) -> int:
    """Bytes a frozen copy of ``module``'s weights takes in its trainee's precision (partitions counted whole)."""
    elt = torch.finfo(torch_dtype(trainee.deepspeed.precision)).bits // 8
    return elt * sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


def saved_param_bytes(path: str, trainee) -> int:
    """Bytes a frozen copy of the model saved at ``path`` takes in its trainee's precision, read from its
    safetensors headers (no weights loaded)."""
    import glob
    import os

    from safetensors import safe_open

    elt = torch.finfo(torch_dtype(trainee.deepspeed.precision)).bits // 8
    n = 0
    for file in glob.glob(os.path.join(path, "*.safetensors")):
        with safe_open(file, "pt") as f:
            n += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return elt * n


def generation_reserve(actor: torch.nn.Module, rl: RLConfig) -> int:
    """Device bytes to leave free for one rollout and one training micro-batch: the fast decoder's copy of
    the actor's weights (bf16) and a margin of a fifth of the device for the KV cache and activations."""
    decoder = 2 * sum(getattr(p, "ds_numel", p.numel()) for n, p in actor.named_parameters() if "lora_" not in n)
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory if torch.cuda.is_available() else 0
    return decoder + total // 5


def placement(rl: RLConfig, device: torch.device, sizes: dict[str, int], reserve: int,
              log: Callable[[str], None] = print, free: int | None = None) -> dict[str, bool]:
    """Which frozen models go to host memory (True) under ``rl.placement``: with 'auto', none while all fit
    the free device memory beside ``reserve``, else the largest first until the rest fit; a flag set to
    true is always honoured; 'manual' is the flags alone. Free memory is measured now (``free``: for tests)."""
    forced = {"reference": rl.offload_reference, "reward": rl.offload_reward}
    if rl.placement == "manual" or device.type != "cuda":
        return forced
    free = torch.cuda.mem_get_info(device)[0] if free is None else free
    out = dict(forced)
    need = sum(n for name, n in sizes.items() if not out[name]) + reserve
    for name in sorted(sizes, key=sizes.get, reverse=True):
        if need <= free:
            break
        if not out[name] and sizes[name]:
            out[name], need = True, need - sizes[name]
    moved = [n for n in sizes if out[n] and not forced[n]]
    log(f"placement auto: {free / 2**30:.1f} GiB free; frozen models {', '.join(f'{n} {sizes[n] / 2**30:.1f} GiB' for n in sizes)}, "
        f"reserve {reserve / 2**30:.1f} GiB; " + (f"in host memory: {', '.join(moved)}" if moved else "all on the device"))
    return out


@contextmanager
def on_device(module: torch.nn.Module, device: torch.device, offloaded: bool) -> Iterator[torch.nn.Module]:
    """Bring an offloaded frozen model to the accelerator for one phase, then back to host memory."""
    if not offloaded or device.type == "cpu":
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to("cpu")
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------- experience


@dataclass(frozen=True)
class Scores:
    """Phase 2's scores of one generation batch, before normalising and scaling ([B] each)."""

    raw: torch.Tensor  # the reward model's score + function_weight x the function's (each where used)
    model: torch.Tensor | None  # the reward model's
    function: torch.Tensor | None  # reward.function's


def make_experience(m: Models, scorer: RewardScorer | None, rollout: Rollout, prompts: list[str], rl: RLConfig,
                    kl_coef: float, timer: Timer, function: RewardFunction | None = None,
                    function_weight: float = 1.0) -> tuple[Experience, Scores]:
    """Phases 2-4 for one generation batch: score, shape rewards, advantages (not yet whitened).

    An answer's score is the reward model's (``scorer``; normalised by its stored mean/std with
    rl.normalize_reward) plus ``function_weight`` x the rule's (``function`` on the prompt and answer texts),
    times rl.reward_scale. The estimator (rl.algorithm's, rlhf_core.maths.advantages) turns scores and the
    per-token KL into advantages; the KL is a reward penalty unless rl.kl.use_kl_loss puts it in the loss.
    Returns the experience and the scores before normalising and scaling."""
    device = rollout.sequences.device
    temperature = rl.generation.logprob_temperature
    seq, att, P = rollout.sequences, rollout.attention_mask, rollout.prompt_len
    mask = rollout.response_mask.float()
    chunk = rl.train_micro_batch_size  # rows per scoring forward: bounds the [rows, A, vocab] logits
    model_scores = function_scores = values = None
    with timer("score"), torch.no_grad():
        m.actor.eval()
        if rl.old_logprobs == "rollout" and rollout.logprobs is not None:
            old_logprobs = rollout.logprobs  # sampled by this actor's weights at this temperature, 0 past the end
        else:
            old_logprobs = sequence_logprobs(m.actor, seq, att, P, temperature, chunk)
        with on_device(m.ref, device, m.ref_offloaded) as ref:
            ref_logprobs = sequence_logprobs(ref, seq, att, P, temperature, chunk)
        if m.critic is not None:
            m.critic.eval()
            values = sequence_values(m.critic, seq, att, P, chunk).float()
        if scorer is not None:
            with on_device(m.reward, device, m.reward_offloaded):
                model_scores = scorer(prompts, rollout)
        if function is not None:  # on the host, on the decoded text
            function_scores = torch.tensor(function(prompts, answer_texts(rollout, m.actor_tok)), device=device)
    scores = torch.zeros(seq.shape[0], device=device)
    raw = torch.zeros(seq.shape[0], device=device)
    if model_scores is not None:
        raw = raw + model_scores
        scores = model_scores
        if rl.normalize_reward:
            scores = (scores - m.reward_meta.score_mean) / max(m.reward_meta.score_std, 1e-6)
    if function_scores is not None:
        raw = raw + function_weight * function_scores
        scores = scores + function_weight * function_scores
    scores = scores * rl.reward_scale
    params = AdvantageParams(kl_coef=0.0 if rl.kl.use_kl_loss else kl_coef, kl_estimator=rl.kl.estimator,
                             reward_clip=rl.reward_clip, gamma=rl.gamma, lam=rl.lam,
                             group_size=rl.n_samples_per_prompt, norm_by_std=rl.norm_adv_by_std)
    with timer("advantages"):
        out = advantage_estimator(rl.advantage_estimator).estimate(scores, old_logprobs, ref_logprobs, values, mask,
                                                                   params)
    exp = Experience(seq, att, mask, old_logprobs, ref_logprobs, values, scores, out.rewards, out.kl, out.advantages,
                     out.returns, P)
    return exp, Scores(raw, model_scores, function_scores)
