from __future__ import annotations

import os
import re

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from rlhf_core.config import PipelineConfig
from rlhf_core.stages.registry import DATA, EVALUATE, EXPORT, MODEL, RL, REPORT, REWARD, SFT
from rlhf_core.storage.store import Manifest, Store
from tasks.runner import cache_key_fn, gpu_slots_held, manifest_of, run_stage, store_for


@task(name="evaluate", cache_key_fn=cache_key_fn(EVALUATE), persist_result=True, retries=1)
def evaluate(cfg: PipelineConfig, data: Manifest, sft: Manifest, reward: Manifest | None, rl: Manifest,
             export: Manifest) -> Manifest:
    """Sample the SFT, final and EMA actors on held-out prompts; report reward, win rate (by the reward model and
    by the gold reward), gold reward, KL to SFT and pretraining perplexity as Prefect artifacts and in the store.
    ``reward`` is None when eval.reward_model is off.

    Invalidated by (its settings view): the data, SFT, reward (when read), step 3 (its training curves) and
    export outputs' contents, the eval section (eval.gold_reward by its module's content), the answer length,
    hybrid_engine (the fast path samples differently), the prompt format and the corpus block size. Runs once across concurrent runs (stage lease); samples on one
    process, holding one slot of rlhf-gpu when resources.gpu_slots > 0.
    """
    result = run_stage(single_process(cfg), EVALUATE, {DATA: data, SFT: sft, REWARD: reward, RL: rl, EXPORT: export},
                       gpu_slots=min(cfg.resources.gpu_slots, 1))
    manifest = manifest_of(result)
    publish(store_for(cfg), manifest)
    return result


def single_process(cfg: PipelineConfig) -> PipelineConfig:
    """Evaluation samples on one device; a multi-process profile runs it as one subprocess."""
    res = cfg.resources
    if res.world_size == 1:
        return cfg
    one = res.model_copy(update={"nnodes": 1, "nproc_per_node": 1, "launcher": "subprocess", "hostfile": None})
    return cfg.model_copy(update={"resources": one})


def publish(store: Store, manifest: Manifest) -> None:
    """The evaluation as Prefect artifacts: the metrics table and the report."""
    publish_tables(f"rlhf-eval-{manifest.key[:12]}".lower(), manifest.metrics["models"],
                   store.read_bytes(EVALUATE, manifest.key, REPORT).decode())


def publish_tables(key: str, models: dict[str, dict[str, float]], report: str) -> None:
    create_table_artifact(key=key + "-metrics", description="Evaluation metrics per actor",
                          table=[{"model": name, **{k: round(v, 4) for k, v in row.items()}} for name, row in models.items()])
    create_markdown_artifact(key=key + "-report", markdown=report, description="Evaluation report")


@task(name="evaluate-model")
def evaluate_model(cfg: PipelineConfig, data: Manifest, sft: Manifest, reward: Manifest | None, model: str, name: str,
                   out: str) -> dict[str, dict[str, float]]:
    """A model the user brings, evaluated as the evaluate stage evaluates the exported actors: sampled on the
    profile's held-out prompts beside its SFT actor, scored by its reward model, the same report (report.md,
    metrics.json, samples.jsonl, plots/) written to the local folder ``out`` and published as artifacts.

    Not cached: a hub name or a folder may hold other weights tomorrow. Runs in this process on
    resources.device, holding one slot of rlhf-gpu when resources.gpu_slots > 0.
    """
    import torch

    from rlhf_core.config.views import EvaluateSettings
    from rlhf_core.stages.evaluate import evaluate_actors, write_evaluation

    store = store_for(cfg)
    settings = EvaluateSettings.from_config(cfg)
    threads = torch.get_num_threads()
    if cfg.resources.cpu_threads:  # as a worker would run (the stage's samples then match it)
        torch.set_num_threads(cfg.resources.cpu_threads)
    try:
        with gpu_slots_held(cfg, min(cfg.resources.gpu_slots, 1)):
            reward_path = store.fetch(REWARD, reward.key, MODEL) if reward is not None else None  # eval.reward_model
            table, rows = evaluate_actors(store, settings, data, store.fetch(SFT, sft.key, MODEL), reward_path,
                                          {name: model}, torch.device(cfg.resources.device))
    finally:
        torch.set_num_threads(threads)
    write_evaluation(out, store, {SFT: sft, **({REWARD: reward} if reward is not None else {})}, settings, table, rows)
    with open(os.path.join(out, REPORT)) as f:
        publish_tables(f"rlhf-eval-model-{_slug(name)}", table, f.read())
    return table


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:40] or "model"
