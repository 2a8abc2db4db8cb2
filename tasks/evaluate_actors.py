from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from rlhf_core.stages import registry as stages
from rlhf_core.config import PipelineConfig
from rlhf_core.storage.store import Manifest, Store
from tasks.runner import cache_key_fn, run_once, run_stage, store_for


def _key_of(params) -> tuple[str, str]:
    p = params
    return stages.EVALUATE, stages.evaluate_key(p["cfg"], p["data"], p["sft"], p["reward"], p["export"])


@task(name="evaluate", cache_key_fn=cache_key_fn(_key_of), persist_result=True, retries=1)
def evaluate(cfg: PipelineConfig, data: Manifest, sft: Manifest, reward: Manifest, export: Manifest) -> Manifest:
    """Sample the SFT, final and EMA actors on held-out prompts; report reward, win rate, gold reward, KL
    to SFT and pretraining perplexity as Prefect artifacts and in the store.

    Invalidated by: the data, SFT, reward and export outputs' contents and the eval section. Runs once
    across concurrent runs (stage lease); samples on one process, holding one slot of rlhf-gpu when
    resources.gpu_slots > 0.
    """
    store, key = store_for(cfg), stages.evaluate_key(cfg, data, sft, reward, export)
    upstream = {stages.DATA: data, stages.SFT: sft, stages.REWARD: reward, stages.EXPORT: export}
    one = cfg.model_copy(update={"resources": _single_process(cfg)})
    result = run_once(cfg, stages.EVALUATE, key, upstream, lambda: run_stage(one, stages.EVALUATE, key, upstream),
                      gpu_slots=min(cfg.resources.gpu_slots, 1))
    publish(store, store.read_manifest(stages.EVALUATE, key))
    return result


def _single_process(cfg: PipelineConfig):
    """Evaluation samples on one device; a multi-process profile runs it as one subprocess."""
    res = cfg.resources
    if res.world_size == 1:
        return res
    return res.model_copy(update={"nnodes": 1, "nproc_per_node": 1, "launcher": "subprocess", "hostfile": None})


def publish(store: Store, manifest: Manifest) -> None:
    """The evaluation as Prefect artifacts: the metrics table, a sample table and the report."""
    models = manifest.metrics["models"]
    key = f"rlhf-eval-{manifest.key[:12]}".lower()
    create_table_artifact(key=key + "-metrics", description="Evaluation metrics per actor",
                          table=[{"model": name, **{k: round(v, 4) for k, v in row.items()}} for name, row in models.items()])
    report = store.read_bytes(stages.EVALUATE, manifest.key, "report.md").decode()
    create_markdown_artifact(key=key + "-report", markdown=report, description="Evaluation report")
