"""Every step-3 algorithm on the bundled task, over seeds: the gold reward's gain over SFT, the negative controls,
the EMA against the final actor, and what the reward model learnt of the task (on CPU, about 15 minutes).

    python benchmarks/tiny_algorithms.py                              # 3 seeds, every algorithm, + controls
    python benchmarks/tiny_algorithms.py --algorithms grpo dpo --seeds 1234

One store (a temporary folder): the data, SFT and reward stages once (the tiny profile), then step 3 for each
algorithm and seed (``rl.seed``) as worker processes, two at a time, each actor sampled on the 128 held-out
prompts as the evaluate stage samples them. ``--controls`` adds one run per algorithm with the reward inverted
(``rl.reward_scale -1``; DPO: ``rl.dpo.invert_preferences``). ``TINY_ALGORITHMS`` (the config change from the
tiny profile to each algorithm) is what the quality tests run too (tests/trainers/test_rl.py).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# From the tiny profile (PPO) to each algorithm. GRPO and RLOO: 8 prompts x 4 answers per step, the same 32
# answers a PPO step samples. DPO: one pass over the reward split's 1600 pairs (100 steps of 16).
TINY_ALGORITHMS: dict[str, dict] = {
    "ppo": {},
    "grpo": {"rl.algorithm": "grpo", "rl.n_samples_per_prompt": 4, "rl.rollout_batch_size": 8},
    "rloo": {"rl.algorithm": "rloo", "rl.n_samples_per_prompt": 4, "rl.rollout_batch_size": 8},
    "reinforce_pp": {"rl.algorithm": "reinforce_pp"},
    "dpo": {"rl.algorithm": "dpo", "rl.max_steps": 100},
}


def inverted(algorithm: str) -> dict:
    """The negative control's change: the reward inverted (DPO: every preference swapped)."""
    return {"rl.dpo.invert_preferences": True} if algorithm == "dpo" else {"rl.reward_scale": -1.0}


def config(root: str, overrides: dict):
    from rlhf_core.config import load_config

    return load_config("tiny", {"storage.root": f"file://{root}", **overrides})


def run_worker(cfg, stage: str, upstream: dict) -> None:
    """One stage as its worker process (what the tasks launch)."""
    from rlhf_core.stages import registry
    from rlhf_core.stages.launch import command, make_job, worker_env, write_job
    from rlhf_core.storage.store import Store

    job = make_job(cfg, stage, registry.key(stage, cfg, upstream), upstream)
    url = write_job(Store.from_config(cfg.storage), job)
    proc = subprocess.run(command(cfg.resources, stage, url), env=worker_env(cpu_threads=1), capture_output=True,
                          text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"{stage} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def output(cfg, stage: str, upstream: dict):
    from rlhf_core.stages import registry
    from rlhf_core.storage.store import Store

    return Store.from_config(cfg.storage).read_manifest(stage, registry.key(stage, cfg, upstream))


class Judge:
    """Samples an actor on the held-out prompts as the evaluate stage does; gold reward, reward-model score and
    KL to SFT per answer."""

    def __init__(self, cfg, up: dict):
        import torch

        from rlhf_core.config.views import EvaluateSettings
        from rlhf_core.data.prepare import load_split
        from rlhf_core.models.causal_lm import load_causal_lm
        from rlhf_core.models.reward_model import load_reward_model
        from rlhf_core.models.tokenizers import load_saved_tokenizer
        from rlhf_core.storage.store import Store
        from rlhf_core.trainers.experience import RewardScorer, tokenize_prompts

        self.store = Store.from_config(cfg.storage)
        sft_path = self.store.fetch("sft", up["sft"].key, "model")
        rm_path = self.store.fetch("reward", up["reward"].key, "model")
        self.tok = load_saved_tokenizer(sft_path, padding_side="left")
        self.rm, self.rm_tok = load_reward_model(rm_path).eval(), load_saved_tokenizer(rm_path, padding_side="right")
        self.scorer = RewardScorer(self.rm, self.rm_tok, self.tok, cfg.data.prompt_format, cfg.reward.max_seq_len,
                                   torch.device("cpu"))
        self.prompts = list(load_split(self.store, up["data"], "rl/eval")["prompt"])[: cfg.eval.num_prompts]
        self.ids = tokenize_prompts(self.prompts, self.tok, cfg.data.prompt_format)
        self.settings = EvaluateSettings.from_config(cfg)
        self.sft = load_causal_lm(sft_path).eval()
        self.base = self.sample(None)

    def sample(self, path: str | None):
        import torch

        from rlhf_core.models.causal_lm import load_causal_lm
        from rlhf_core.stages.evaluate import sample_model

        model = load_causal_lm(path).eval() if path else self.sft
        return sample_model(model, self.sft, self.tok, self.scorer, self.prompts, self.ids, self.settings,
                            torch.device("cpu"), None)

    def row(self, path: str) -> dict:
        from rlhf_core.stages.evaluate import win_rate

        s = self.sample(path)
        n = len(s.answers)
        return {"gold": sum(s.gold) / n, "gold_gain": (sum(s.gold) - sum(self.base.gold)) / n,
                "gold_win_rate": win_rate(s.gold, self.base.gold), "rm_win_rate": win_rate(s.scores, self.base.scores),
                "kl": sum(s.kl) / n, "answers": s.answers}

    def contrasts(self, n: int = 300, seed: int = 7) -> dict[str, float]:
        """The reward model's accuracy on each contrast kind of the bundled task (rlhf_core/data/tiny_task.py)."""
        return reward_model_contrasts(self.rm, self.rm_tok, n, seed)


def score_rows(rm, tok, rows: list[dict[str, str]]):
    """A reward model's scores of each row's chosen and rejected answer ([N] each): prompt + answer + EOS."""
    import torch

    from rlhf_core.models.reward_model import sequence_scores

    def scores(answers: list[str]) -> torch.Tensor:
        ids_rows = [tok(r["prompt"])["input_ids"] + tok(" " + a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                    for r, a in zip(rows, answers)]
        T = max(map(len, ids_rows))
        ids = torch.full((len(ids_rows), T), tok.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(ids_rows):
            ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
        with torch.no_grad():
            return sequence_scores(rm(ids, mask), mask)

    return scores([r["chosen"] for r in rows]), scores([r["rejected"] for r in rows])


def reward_model_contrasts(rm, tok, n: int = 300, seed: int = 7) -> dict[str, float]:
    """Accuracy of a reward model on ``n`` pairs of each contrast kind (``tiny_task.CONTRASTS``) and on
    independent pairs: the share where it scores the gold reward's choice higher."""
    from rlhf_core.data import tiny_task

    rng = random.Random(seed)
    out = {}
    for kind in (*tiny_task.CONTRASTS, "independent"):
        rows = (tiny_task.contrast_pairs(rng, kind, n) if kind != "independent" else
                [tiny_task.sample_pair(rng, shares={}) for _ in range(n)])
        chosen, rejected = score_rows(rm, tok, rows)
        out[kind] = float((chosen > rejected).float().mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algorithms", nargs="+", default=list(TINY_ALGORITHMS), choices=list(TINY_ALGORITHMS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2])
    ap.add_argument("--controls", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--store", help="a store folder to use (and keep); default: a temporary one")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tiny_algorithms_cpu.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="rlhf-algos-") as tmp:
        root = args.store or tmp
        t0 = time.perf_counter()
        base = config(root, {})
        from rlhf_core.stages import registry
        from rlhf_core.stages.launch import make_job, run_job

        run_job(make_job(base, "data", registry.key("data", base, {}), {}))
        up = {"data": output(base, "data", {})}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda s: run_worker(base, s, {"data": up["data"]}), ["sft", "reward"]))
        up.update({s: output(base, s, {"data": up["data"]}) for s in ("sft", "reward")})
        print(f"data, SFT and reward: {time.perf_counter() - t0:.0f} s; reward eval accuracy "
              f"{up['reward'].metrics['eval_accuracy']:.3f}", flush=True)

        runs = [(a, seed, False) for a in args.algorithms for seed in args.seeds]
        runs += [(a, args.seeds[0], True) for a in args.algorithms] if args.controls else []
        cfgs = {r: config(root, {**TINY_ALGORITHMS[r[0]], "rl.seed": r[1], **(inverted(r[0]) if r[2] else {})})
                for r in runs}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = {r: pool.submit(run_worker, cfgs[r], "rl", up) for r in runs}
            for r, f in futures.items():
                f.result()
                print(f"trained {r}", flush=True)
        judge = Judge(base, up)
        contrasts = judge.contrasts()
        rows = []
        for r in runs:
            m = output(cfgs[r], "rl", up)
            final = judge.row(judge.store.fetch("rl", m.key, "actor"))
            ema = judge.row(judge.store.fetch("rl", m.key, "actor_ema"))
            same = sum(a == b for a, b in zip(final.pop("answers"), ema.pop("answers")))
            rows.append({"algorithm": r[0], "seed": r[1], "inverted": r[2], "final": final, "ema": ema,
                         "ema_answers_identical_to_final": same, "train_seconds": m.metrics.get("train_seconds")})
        sft_gold = sum(judge.base.gold) / len(judge.base.gold)
    if Path(args.out).exists():  # keep the other algorithms' rows of an earlier run (same data, SFT and reward)
        rows = [r for r in json.loads(Path(args.out).read_text())["rows"] if r["algorithm"] not in args.algorithms] + rows
    result = {"reward_contrast_accuracy": contrasts, "sft_gold": sft_gold, "prompts": len(judge.prompts),
              "rows": rows, "seconds": round(time.perf_counter() - t0)}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nreward model accuracy by contrast kind: " + ", ".join(f"{k} {v:.2f}" for k, v in contrasts.items()))
    print(f"SFT gold reward {sft_gold:.3f} on {len(judge.prompts)} held-out prompts\n")
    print("| algorithm | gold gain over SFT, final (mean +- sd over seeds) | EMA | gold win rate | RM win rate | "
          "KL final | KL EMA | EMA answers = final | inverted: gold gain |")
    print("|---" * 9 + "|")
    for a in dict.fromkeys(r["algorithm"] for r in rows):
        mine = [r for r in rows if r["algorithm"] == a and not r["inverted"]]
        ctrl = [r for r in rows if r["algorithm"] == a and r["inverted"]]

        def ms(xs):
            return f"{statistics.mean(xs):+.2f} +- {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:+.2f}"

        print(f"| {a} | {ms([r['final']['gold_gain'] for r in mine])} | {ms([r['ema']['gold_gain'] for r in mine])} | "
              f"{statistics.mean(r['final']['gold_win_rate'] for r in mine):.2f} | "
              f"{statistics.mean(r['final']['rm_win_rate'] for r in mine):.2f} | "
              f"{statistics.mean(r['final']['kl'] for r in mine):.2f} | {statistics.mean(r['ema']['kl'] for r in mine):.2f} | "
              f"{statistics.mean(r['ema_answers_identical_to_final'] for r in mine):.0f}/{len(judge.prompts)} | "
              f"{ms([r['final']['gold_gain'] for r in ctrl]) if ctrl else '-'} |")
    print(f"\n{result['seconds']} s on {os.cpu_count()} CPU cores; results in {args.out}")


if __name__ == "__main__":
    main()
