"""Evaluation: sample from the SFT, final and EMA actors on held-out prompts and compare them.

Per model: mean reward-model score and win rate against SFT judged by it (on the same prompt; ties count
half), the gold reward (``eval.gold_reward``, a rule-based function such as the bundled task's) and the win
rate against SFT judged by it, KL to SFT (exact over the vocabulary along the model's own answers, summed per
answer), perplexity on the held-out pretraining corpus, answer length. The reward model's judgement can be
gamed by the policy it trained; the gold reward's cannot, so both win rates are reported side by side.
Written to the store: ``report.md``, ``metrics.json``, ``samples.jsonl`` and PNG plots (training curves of
every stage, evaluation bars); the Prefect task turns them into artifacts.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from rlhf_core.config.views import EvaluateSettings
from rlhf_core.data.prepare import load_split
from rlhf_core.data.ptx import load_blocks
from rlhf_core.engines.hybrid import HybridEngine, Rollout, left_pad
from rlhf_core.models.causal_lm import load_causal_lm
from rlhf_core.models.reward_model import load_reward_model, reward_meta
from rlhf_core.models.tokenizers import load_saved_tokenizer, same_tokenizer
from rlhf_core.stages.context import StageContext
from rlhf_core.stages.export import EXPORTS
from rlhf_core.stages.registry import (DATA, EXPORT, LOGS, METRICS, MODEL, PLOTS, RL, REPORT, REWARD, SAMPLES,
                                       SFT)
from rlhf_core.storage.store import Manifest, Store
from rlhf_core.models.reward_function import RewardFunction
from rlhf_core.trainers.experience import RewardScorer, answer_texts, gold_function, model_kwargs, tokenize_prompts
from rlhf_core.trainers.metrics import plot_curves

CURVE_KEYS = ["reward/score", "gold/reward", "kl/mean", "rl/policy_loss", "rl/value_loss", "rl/kl_loss", "rl/ptx_loss",
              "rl/clipfrac", "gen/answer_len", "kl/coef",
              "loss", "accuracy", "margin", "eval/accuracy", "eval/margin", "ptx_loss"]  # the last: DPO's


@dataclass
class ModelSamples:
    answers: list[str]
    scores: list[float] | None  # by the reward model (eval.reward_model)
    gold: list[float] | None  # by eval.gold_reward
    kl: list[float]  # per answer, summed over tokens
    lengths: list[int]
    ptx_perplexity: float | None


@torch.no_grad()
def exact_kl(model, ref, rollout: Rollout, temperature: float) -> torch.Tensor:
    """sum_t KL(pi(.|ctx_t) || pi_ref(.|ctx_t)) over each answer's tokens ([B]); exact over the vocabulary."""
    P = rollout.prompt_len
    kwargs = model_kwargs(model, rollout.sequences, rollout.attention_mask)
    logp = torch.log_softmax(model(**kwargs, use_cache=False).logits[:, P - 1:-1].float() / temperature, -1)
    logq = torch.log_softmax(ref(**kwargs, use_cache=False).logits[:, P - 1:-1].float() / temperature, -1)
    per_token = (logp.exp() * (logp - logq)).sum(-1)
    return (per_token * rollout.response_mask).sum(1)


@torch.no_grad()
def corpus_perplexity(model, blocks: torch.Tensor, device: torch.device, batch: int = 16) -> float:
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch):
        ids = blocks[i:i + batch].to(device)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                 reduction="sum")
        total, count = total + loss.item(), count + ids[:, 1:].numel()
    return math.exp(total / max(count, 1))


def sample_model(model, sft, tok, scorer: RewardScorer | None, prompts: list[str], prompt_ids: list[list[int]],
                 settings: EvaluateSettings, device: torch.device, blocks: torch.Tensor | None,
                 batch: int = 32, gold: RewardFunction | None = None) -> ModelSamples:
    """Answers of ``model`` to every prompt, scored by the reward model (``scorer``) and the gold reward
    (``gold``; default: eval.gold_reward's), with their exact KL to ``sft`` (None: no KL)."""
    gen = settings.generation
    engine = HybridEngine(model, tok, gen, settings.hybrid_engine)
    gold = gold or gold_function(settings.eval.gold_reward)
    torch.manual_seed(settings.eval.seed)  # every model samples with the same seed
    out = ModelSamples([], [] if scorer is not None else None, [] if gold is not None else None, [], [], None)
    for i in range(0, len(prompts), batch):
        ids, mask = left_pad(prompt_ids[i:i + batch], tok.pad_token_id, device)
        rollout = engine.generate(ids, mask)
        texts = answer_texts(rollout, tok)
        out.answers += texts
        if scorer is not None:
            out.scores += scorer(prompts[i:i + batch], rollout).tolist()
        if sft is not None:  # None: another vocabulary than the SFT actor's, so no KL to it
            out.kl += (exact_kl(model, sft, rollout, gen.logprob_temperature).tolist() if model is not sft
                       else [0.0] * len(texts))
        out.lengths += rollout.response_mask.sum(1).tolist()
        if gold is not None:
            out.gold += gold(prompts[i:i + batch], texts)
    if blocks is not None:
        out.ptx_perplexity = corpus_perplexity(model, blocks, device)
    return out


def win_rate(scores: list[float], base: list[float]) -> float:
    """Share of prompts where ``scores`` beat ``base`` (the same prompt's answer), ties counting half."""
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, base)) / len(scores)


def summarize(samples: dict[str, ModelSamples]) -> dict[str, dict[str, float]]:
    base = samples[SFT]
    table = {}
    for name, s in samples.items():
        n = len(s.answers)
        row: dict[str, float] = {}
        if s.scores is not None:
            row.update(reward_score=sum(s.scores) / n, win_rate_vs_sft=win_rate(s.scores, base.scores))
        if s.gold is not None:
            row.update(gold_reward=sum(s.gold) / n, gold_win_rate_vs_sft=win_rate(s.gold, base.gold))
        if s.kl:
            row["kl_to_sft"] = sum(s.kl) / n
        row["answer_len"] = sum(s.lengths) / n
        if s.ptx_perplexity is not None:
            row["ptx_perplexity"] = s.ptx_perplexity
        table[name] = row
    return table


def run_evaluate(ctx: StageContext) -> Manifest | None:
    settings: EvaluateSettings = ctx.settings
    if not ctx.is_main:  # evaluation is one process's work; the others only keep the launcher happy
        return None
    export = ctx.upstream[EXPORT]
    actors = {name: ctx.fetch(EXPORT, name) for name in EXPORTS
              if any(f.path.startswith(f"{name}/") for f in export.files)}
    reward_path = ctx.fetch(REWARD, MODEL) if settings.reads_reward_output else None
    table, rows = evaluate_actors(ctx.store, settings, ctx.upstream[DATA], ctx.fetch(SFT, MODEL), reward_path, actors,
                                  ctx.dist.device)
    return ctx.write_output(lambda folder: write_evaluation(folder, ctx.store, ctx.upstream, settings, table, rows),
                            {"models": table, "prompts": len(rows)})


def evaluate_actors(store: Store, settings: EvaluateSettings, data: Manifest, sft_path: str, reward_path: str | None,
                    actors: dict[str, str], device: torch.device) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """Sample the SFT actor and every one of ``actors`` (name -> local path, store URL or hub name) on the
    data output's held-out PPO prompts and score them: the evaluate stage's table (model -> metric -> value)
    and its per-prompt rows. An actor with another vocabulary than the SFT actor's is prompted in its own
    tokens and scored by the reward model through text; KL to SFT and the corpus perplexity (whose tokens
    are the SFT actor's) are then left out of its row. Without ``reward_path`` (eval.reward_model off) the gold
    reward alone judges.

    Raises:
        ModelLoadError: an actor or its tokenizer cannot be loaded.
    """
    tok = load_saved_tokenizer(sft_path, padding_side="left")
    rm = scorer = None
    if reward_path is not None:
        rm = load_reward_model(reward_path).to(device).eval()
        reward_tok, max_len = load_saved_tokenizer(reward_path), reward_meta(reward_path).max_seq_len
        scorer = RewardScorer(rm, reward_tok, tok, settings.prompt_format, max_len, device)
    prompts = list(load_split(store, data, f"{RL}/eval")["prompt"])[: settings.eval.num_prompts]
    prompt_ids = tokenize_prompts(prompts, tok, settings.prompt_format)
    blocks = None
    if any(f.path == "ptx/eval.arrow" for f in data.files):
        blocks = load_blocks(store, data, tok, settings.ptx_block_tokens, settings.eval.ptx_blocks, split="eval")

    sft = load_causal_lm(sft_path, what="the SFT actor").to(device).eval()
    samples = {SFT: sample_model(sft, sft, tok, scorer, prompts, prompt_ids, settings, device, blocks)}
    for name, path in actors.items():
        model = load_causal_lm(path, what=f"the {name} actor").to(device).eval()
        own = load_saved_tokenizer(path, padding_side="left", pad_with_eos=True)
        if same_tokenizer(own, tok):
            samples[name] = sample_model(model, sft, tok, scorer, prompts, prompt_ids, settings, device, blocks)
        else:
            own_scorer = RewardScorer(rm, reward_tok, own, settings.prompt_format, max_len, device) if rm else None
            samples[name] = sample_model(model, None, own, own_scorer, prompts,
                                         tokenize_prompts(prompts, own, settings.prompt_format), settings, device, None)
        del model
    table = summarize(samples)
    rows = [{"prompt": p, **{f"{n}_answer": s.answers[i] for n, s in samples.items()},
             **({f"{n}_score": s.scores[i] for n, s in samples.items()} if scorer is not None else {}),
             **({f"{n}_gold": s.gold[i] for n, s in samples.items()} if samples[SFT].gold is not None else {})}
            for i, p in enumerate(prompts)]
    return table, rows


def write_evaluation(folder: str, store: Store, upstream: dict[str, Manifest], settings: EvaluateSettings,
                     table: dict[str, dict[str, float]], rows: list[dict[str, Any]]) -> None:
    """The evaluation's files in ``folder``: report.md, metrics.json, samples.jsonl and plots/ (the training
    curves of the ``upstream`` stages that have them, and the evaluation's bars)."""
    os.makedirs(os.path.join(folder, PLOTS), exist_ok=True)
    plots = _plots(store, upstream, table, os.path.join(folder, PLOTS))
    with open(os.path.join(folder, SAMPLES), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(folder, METRICS), "w") as f:
        f.write(json.dumps(table, indent=2, sort_keys=True) + "\n")
    with open(os.path.join(folder, REPORT), "w") as f:
        f.write(render_report(settings, table, rows, plots))


def _plots(store: Store, upstream: dict[str, Manifest], table: dict[str, dict[str, float]],
           folder: str) -> dict[str, str]:
    """Training curves of each upstream training stage (from their metric logs) and a bar chart of the
    evaluation, as PNGs in ``folder``; returns title -> file name."""
    plots = {}
    for stage, keys in ((RL, CURVE_KEYS), (SFT, None), (REWARD, None)):
        m = upstream.get(stage)
        if m is None:
            continue
        try:
            raw = store.read_bytes(m.stage, m.key, f"{LOGS}/metrics.jsonl")
        except FileNotFoundError:
            continue
        history = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
        name = f"{stage}_curves.png"
        if plot_curves(history, os.path.join(folder, name), f"{stage} training", keys):
            plots[f"{stage} training"] = name
    _bars(table, os.path.join(folder, "evaluation.png"))
    plots["evaluation"] = "evaluation.png"
    return plots


def _bars(table: dict[str, dict[str, float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(next(iter(table.values())))
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.6 * len(metrics), 2.8))
    for ax, metric in zip(axes, metrics):
        names = list(table)
        ax.bar(names, [table[n].get(metric, math.nan) for n in names],
               color=["#999999", "#3b75af", "#e1812c", "#3a923a"][: len(names)])
        ax.set_title(metric, fontsize=9)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_report(settings: EvaluateSettings, table: dict[str, dict[str, float]], rows: list[dict[str, Any]],
                  plots: dict[str, str]) -> str:
    e = settings.eval
    metrics = list(next(iter(table.values())))
    how = f"sampled (temperature {e.temperature})" if e.do_sample else "greedy"
    judges = (["`reward_score` and `win_rate_vs_sft` use the reward model (which the policy was trained on, and "
               "can game)"] if "reward_score" in metrics else []) + \
        ([f"`gold_reward` and `gold_win_rate_vs_sft` use the gold reward `{e.gold_reward}`"] if e.gold_reward else [])
    lines = ["# RLHF evaluation", "",
             f"{len(rows)} held-out prompts; answers {how}, seed {e.seed}. " + "; ".join(judges) + ". Win rates count "
             "ties half. KL to SFT is exact over the vocabulary, summed per answer.", "",
             "| model | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[m]:.3f}" if m in row else "n/a" for m in metrics) + " |")
    if any(m not in row for row in table.values() for m in metrics):
        lines += ["", "n/a: that model's tokenizer is not the SFT actor's, so it has no KL to SFT and no perplexity on "
                  "the corpus as the SFT actor's tokens cut it; its answers are scored by the reward model as text."]
    lines += ["", "## Plots", ""]
    lines += [f"- [{title}]({PLOTS}/{name})" for title, name in plots.items()]
    lines += ["", "## Samples", ""]
    names = list(table)
    lines.append("| prompt | " + " | ".join(names) + " |")
    lines.append("|---" * (len(names) + 1) + "|")
    judge = "score" if f"{SFT}_score" in rows[0] else "gold"
    for r in rows[: e.samples_in_report]:
        cells = [f"{r[f'{n}_answer']} ({r[f'{n}_{judge}']:.2f}" + (f", gold {r[f'{n}_gold']:.2f})" if judge == "score" and f"{n}_gold" in r else ")")
                 for n in names]
        lines.append(f"| {r['prompt'].strip()} | " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"
