from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from rlhf_core.config import PipelineConfig
from rlhf_core.stages.registry import DATA, EVALUATE, EXPORT, RL, REPORT, REWARD, SFT
from rlhf_core.storage.store import Manifest, Store
from tasks.runner import cache_key_fn, manifest_of, run_stage, store_for


@task(name="evaluate", cache_key_fn=cache_key_fn(EVALUATE), persist_result=True, retries=1)
def evaluate(cfg: PipelineConfig, data: Manifest, sft: Manifest, reward: Manifest | None, rl: Manifest,
             export: Manifest) -> Manifest:
    """Sample the SFT, final and EMA actors on held-out prompts; report reward, win rate (by the reward model and
    by the gold reward), gold reward, KL to SFT and pretraining perplexity as Prefect artifacts and in the store.
    ``reward`` is None when eval.reward_model is off.

    Invalidated by (its settings view): the data, SFT, reward (when read), step 3 (its training curves) and
    export outputs' contents, the eval section (eval.gold_reward by its module's content), the answer length, hybrid_engine (the fast path samples differently), the
    prompt format and the corpus block size. Runs once across concurrent runs (stage lease); samples on one
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
    models = manifest.metrics["models"]
    key = f"rlhf-eval-{manifest.key[:12]}".lower()
    create_table_artifact(key=key + "-metrics", description="Evaluation metrics per actor",
                          table=[{"model": name, **{k: round(v, 4) for k, v in row.items()}} for name, row in models.items()])
    report = store.read_bytes(EVALUATE, manifest.key, REPORT).decode()
    create_markdown_artifact(key=key + "-report", markdown=report, description="Evaluation report")
