"""The stage registry: one record per stage, read by the cache keys, the flows' graph, the worker entry,
lineage, garbage collection and the run summary (DESIGN.md: "Cache keys and resume").

Key = hash(stage name, stage version, the stage's settings view, the upstream outputs' content ids). The
view (``rlhf_core/config/views.py``) is exactly what the stage's worker is given, so the key holds every
setting the stage can read; fields that name files count by the files' content (``CONTENT_KEYED``). No
run id, storage root or launcher: a new flow run, a retry, or the same config on another machine reuses
a finished stage. Bump a stage's ``version`` when its code changes what it writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from rlhf_core.config import PipelineConfig, SourceConfig
from rlhf_core.config.schema import CONTENT_KEYED, FUNCTION_KEYED, Section
from rlhf_core.config.views import (DataSettings, EvaluateSettings, ExportSettings, RLSettings, RewardSettings,
                                    SFTSettings)
from rlhf_core.storage.store import Manifest, hash_key

DATA, SFT, REWARD, RL, EXPORT, EVALUATE = "data", "sft", "reward", "rl", "export", "evaluate"

# What stage outputs hold (relative to <stage>/<key>/), one name each.
MODEL = "model"  # sft, reward: an HF folder (the reward model's with its value head and meta)
LOGS = "logs"  # training stages: metrics.jsonl, tensorboard/, curves.png
ACTOR, ACTOR_EMA, CRITIC = "actor", "actor_ema", "critic"  # rl
FINAL, EMA = "final", "ema"  # export: plain HF folders
REPORT, METRICS, SAMPLES, PLOTS = "report.md", "metrics.json", "samples.jsonl", "plots"  # evaluate


@dataclass(frozen=True)
class Stage:
    name: str
    version: int
    inputs: tuple[str, ...]  # stages whose outputs this one may read (the pipeline's graph)
    settings: type[Section]  # its view; ``settings.from_config(cfg)`` cuts it out of a config
    entry: str  # "module:function" that runs it on a StageContext (rank 0 returns the manifest)
    worker: bool  # True: a worker process (torchrun / DeepSpeed launcher); False: inside its Prefect task
    outputs: tuple[str, ...]  # what its output folder holds
    headline: tuple[str, ...]  # metric keys a person looks at first (the first one present)
    title: str
    # inputs read only under some settings: input -> whether this view reads it (the rest are always read)
    optional: dict[str, Callable[[Any], bool]] = field(default_factory=dict)

    def settings_of(self, cfg: PipelineConfig) -> Section:
        return self.settings.from_config(cfg)  # type: ignore[attr-defined]

    def inputs_of(self, settings: Section) -> tuple[str, ...]:
        """The stages whose outputs this stage reads with these settings: the one place the flows' graph, the
        keys, the tasks, preflight and the run summary learn it from (lineage and gc read the manifests)."""
        return tuple(up for up in self.inputs if up not in self.optional or self.optional[up](settings))


STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage(DATA, 3, (), DataSettings, "rlhf_core.data.prepare:run_data_stage", False,
          ("sft/", "reward/", "rl/", "ptx/"), ("rows",), "unify, split and blend the sources"),
    Stage(SFT, 3, (DATA,), SFTSettings, "rlhf_core.trainers.sft:train_sft", True,
          (MODEL, LOGS), ("eval_loss",), "step 1: supervised fine-tuning of the actor"),
    Stage(REWARD, 3, (DATA,), RewardSettings, "rlhf_core.trainers.reward:train_reward", True,
          (MODEL, LOGS), ("eval_accuracy",), "step 2: the reward model"),
    # No reward model with DPO, or with a rule-based reward alone (PPO still starts its critic from one).
    Stage(RL, 4, (DATA, SFT, REWARD), RLSettings, "rlhf_core.trainers.rl:train_rl", True,
          (ACTOR, ACTOR_EMA, CRITIC, LOGS), ("gold_last", "reward_last", "eval_accuracy"),
          "step 3: reinforcement learning of the actor (PPO, GRPO, RLOO, REINFORCE++ or DPO)",
          optional={REWARD: lambda s: s.reads_reward_output}),
    Stage(EXPORT, 4, (RL,), ExportSettings, "rlhf_core.stages.export:run_export", False,
          (FINAL, EMA), ("models",), "the final and EMA actors as plain HF models"),
    Stage(EVALUATE, 4, (DATA, SFT, REWARD, RL, EXPORT), EvaluateSettings, "rlhf_core.stages.evaluate:run_evaluate",
          True, (REPORT, METRICS, SAMPLES, PLOTS), ("gold_win_rate_vs_sft", "win_rate_vs_sft", "gold_reward", "reward_score"),
          "samples and scores of the SFT, final and EMA actors", optional={REWARD: lambda s: s.reads_reward_output}),
]}
ORDER = list(STAGES)


def stage(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; stages are {', '.join(ORDER)}") from None


def inputs(name: str, cfg: PipelineConfig) -> tuple[str, ...]:
    """The stages whose outputs stage ``name`` reads under ``cfg`` (``Stage.inputs_of`` on its view)."""
    s = stage(name)
    return s.inputs_of(s.settings_of(cfg))


def needed_for(name: str, cfg: PipelineConfig) -> set[str]:
    """``name`` and every stage it is made from under ``cfg``, transitively (``needed_for('rl', cfg)`` has no
    export; with rl.algorithm dpo it has no reward either)."""
    out = {name}
    for up in inputs(name, cfg):
        out |= needed_for(up, cfg)
    return out


# -------------------------------------------------------------------------------------------------- keys


def key_payload(view: Any, path: str = "", parent: Any = None, read: set[str] | None = None) -> Any:
    """The JSON a view contributes to its key: every field, with file names replaced by their content
    (``CONTENT_KEYED`` fields, and a source's files as its layout reads them) and function references by their
    module file's content (``FUNCTION_KEYED``). ``read`` collects the
    dotted paths of the fields the payload holds (the tests check a worker's reads against them)."""
    from rlhf_core.storage.fingerprint import function_fingerprint, reference_fingerprint

    read = set() if read is None else read
    if isinstance(view, SourceConfig):
        out = {name: key_payload(getattr(view, name), f"{path}{name}.", view, read)
               for name in type(view).model_fields if name not in ("path", "eval_path")}
        read |= {f"{path}path", f"{path}eval_path"}
        out["content"] = source_content(view)
        return out
    if isinstance(view, BaseModel):
        out = {}
        for name, field in type(view).model_fields.items():
            value = getattr(view, name)
            if field.json_schema_extra == CONTENT_KEYED:
                read.add(f"{path}{name}")
                out[name] = None if value is None else reference_fingerprint(value, getattr(view, "revision", None))
            elif field.json_schema_extra == FUNCTION_KEYED:
                read.add(f"{path}{name}")
                out[name] = None if value is None else function_fingerprint(value)
            else:
                out[name] = key_payload(value, f"{path}{name}.", view, read)
        return out
    if isinstance(view, (list, tuple)) and any(isinstance(v, BaseModel) for v in view):
        return [key_payload(v, f"{path}{i}.", view, read) for i, v in enumerate(view)]
    read.add(path.rstrip("."))
    return to_jsonable_python(view)


def source_content(src: SourceConfig) -> Any:
    """A data source's content: its files' hashes as its layout reads them, in order and named relative to the
    source's path (HH-RLHF's subsets all hold a train.jsonl.gz), or the hub dataset's commit."""
    from rlhf_core.data.adapters import relative_name, source_files
    from rlhf_core.storage.fingerprint import file_fingerprint, hub_revision

    if src.path is None:
        return {"hub": src.name, "revision": hub_revision(src.name, kind="dataset")}
    return [[relative_name(src, url), file_fingerprint(url)] for url in source_files(src)]


def key_of_settings(name: str, settings: Section, upstream: dict[str, Manifest]) -> str:
    s = stage(name)
    reads = s.inputs_of(settings)
    missing = set(reads) - set(upstream)
    if missing:
        raise ValueError(f"the {name} key needs the outputs of {sorted(missing)}")
    return hash_key({"stage": name, "version": s.version, "settings": key_payload(settings),
                     "upstream": {up: upstream[up].content_id for up in reads}})


def key(name: str, cfg: PipelineConfig, upstream: dict[str, Manifest] | None = None) -> str:
    """The cache key of stage ``name`` for ``cfg``, given the manifests of the stages it is made from."""
    return key_of_settings(name, stage(name).settings_of(cfg), upstream or {})


def headline(m: Manifest) -> str:
    """The number a person looks at first, as text (``rlhf store ls``, the run summary)."""
    s = STAGES.get(m.stage)
    if s is None:
        return ""
    if m.stage == EVALUATE:
        models = m.metrics.get("models") or {}
        best = models.get("final") or models.get("ema") or {}
        for k in s.headline:
            if k in best:
                return f"final {k} {best[k]:.3f}"
        return ""
    for k in s.headline:
        v = m.metrics.get(k)
        if isinstance(v, dict):  # data rows per split: the training splits
            return "rows " + " ".join(f"{n.split('/')[0]} {c}" for n, c in v.items() if n.endswith("/train"))
        if v is not None:
            return f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
    return ""
