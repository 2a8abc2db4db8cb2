"""Same key, same bytes: every stage reads only what its key holds, every setting a stage reads changes its
key, and outputs with equal keys hold equal bytes.

(a) Each stage runs on the tiny task with its settings view wrapped in a recorder; every field it reads must
    be one the key's payload holds (negative control: a payload that leaves out a field the stage reads is
    caught).
(b) Every leaf of the tiny config is changed in turn: a stage's key changes exactly when its settings view
    does (file names count by content); nothing outside every view changes any key.
(c) Two fresh stores whose configs differ in one leaf: every output that gets the same key in both holds
    the same bytes, every file of it.
"""

from __future__ import annotations

import shutil
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from rlhf_core.config import PipelineConfig, apply_overrides, validate_config
from rlhf_core.config.schema import CONTENT_KEYED
from rlhf_core.config.views import leaf_paths
from rlhf_core.stages import registry
from rlhf_core.stages.context import DistInfo
from rlhf_core.stages.launch import context_of, entry_of, make_job
from rlhf_core.storage.store import Manifest, Store
from tests.conftest import tiny_config

SMALL = {"sft.max_steps": 3, "sft.checkpoint_every": 2, "reward.max_steps": 3, "reward.checkpoint_every": 2,
         "rl.max_steps": 2, "rl.checkpoint_every": 1, "eval.num_prompts": 8, "eval.ptx_blocks": 4}


# ------------------------------------------------------------------------------------------ (a) reads


class Recorder:
    """A settings view (or a section of one) that records the dotted path of every field read through it.

    It passes ``isinstance`` checks as the section it wraps, evaluates properties against itself (so a
    property's own reads are recorded), and returns leaves as they are. ``model_dump`` (the manifest's
    copy of the settings) is not counted as a read."""

    def __init__(self, obj: BaseModel, path: str, reads: set[str]):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_reads", reads)

    @property
    def __class__(self):  # noqa: D105 - isinstance(recorder, ModelSpec) is True for a wrapped ModelSpec
        return type(object.__getattribute__(self, "_obj"))

    def __getattr__(self, name: str) -> Any:
        obj, path, reads = self._obj, self._path, self._reads
        attr = getattr(type(obj), name, None)
        if isinstance(attr, property):
            return attr.fget(self)
        value = getattr(obj, name)
        if name not in type(obj).model_fields:
            return value  # a method (model_dump, ...)
        where = f"{path}{name}"
        if isinstance(value, BaseModel):
            return Recorder(value, where + ".", reads)
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, BaseModel) for v in value):
            return [Recorder(v, f"{where}.{i}.", reads) for i, v in enumerate(value)]
        reads.add(where)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        raise TypeError("settings are frozen")

    def __eq__(self, other: Any) -> bool:
        return self._obj == (other._obj if isinstance(other, Recorder) else other)

    def __hash__(self) -> int:
        return hash(self._obj)


def unkeyed_reads(reads: set[str], keyed: set[str]) -> set[str]:
    """Reads that the key's payload does not hold (a field is covered by itself or by a parent)."""
    return {r for r in reads if not any(r == k or r.startswith(k + ".") for k in keyed)}


def _run_recorded(cfg: PipelineConfig, name: str, upstream: dict[str, Manifest]) -> tuple[Manifest, set[str], set[str]]:
    """Run stage ``name`` in this process on its recorded view; returns its manifest, the fields it read
    and the fields its key holds."""
    from rlhf_core.engines.training import init_distributed

    record = registry.stage(name)
    job = make_job(cfg, name, registry.key(name, cfg, upstream), upstream)
    dist = init_distributed("cpu", cpu_threads=1) if record.worker else DistInfo.single()
    ctx = context_of(job, dist)
    keyed: set[str] = set()
    registry.key_payload(ctx.settings, read=keyed)
    reads: set[str] = set()
    ctx.settings = Recorder(ctx.settings, "", reads)
    manifest = entry_of(record)(ctx)
    assert manifest is not None and manifest.key == job.key
    return manifest, reads, keyed


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Every stage of the tiny pipeline, each on its recorded view: stage -> (manifest, reads, keyed)."""
    cfg = tiny_config(tmp_path_factory.mktemp("recorded"), **SMALL)
    out: dict[str, tuple[Manifest, set[str], set[str]]] = {}
    for name in registry.ORDER:
        upstream = {up: out[up][0] for up in registry.inputs(name, cfg)}
        out[name] = _run_recorded(cfg, name, upstream)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", registry.ORDER)
def test_every_stage_reads_only_what_its_key_holds(recorded, name):
    _, reads, keyed = recorded[name]
    assert reads, f"{name} read nothing through its settings: the recorder is not wired in"
    assert unkeyed_reads(reads, keyed) == set(), f"{name} read settings its key does not hold"


@pytest.mark.slow
def test_negative_control_an_unkeyed_read_is_caught(recorded):
    """A key payload that leaves out a field the stage reads (as the SFT key once left out export.dtype)."""
    _, reads, keyed = recorded[registry.SFT]
    assert "sft.mask_prompt" in reads
    assert unkeyed_reads(reads, keyed - {"sft.mask_prompt"}) == {"sft.mask_prompt"}
    _, reads, keyed = recorded[registry.DATA]
    assert "data.sources.0.path" in reads  # a file the stage reads counts by its content
    assert unkeyed_reads(reads, keyed - {"data.sources.0.path"}) == {"data.sources.0.path"}


# ------------------------------------------------------------------------------------- (b) every leaf


def _fake_upstream() -> dict[str, Manifest]:
    """Fixed upstream manifests, so that keys depend only on the config."""
    return {name: Manifest(stage=name, key="k" * 20, stage_version=1, content_id=f"content-of-{name}", config={},
                           files=[], created_at="2026-01-01T00:00:00") for name in registry.ORDER}


def _keys_and_views(cfg: PipelineConfig) -> dict[str, tuple[str, BaseModel]]:
    up = _fake_upstream()
    return {name: (registry.key(name, cfg, up), registry.stage(name).settings_of(cfg)) for name in registry.ORDER}


def _annotation(path: str) -> Any:
    """The type annotation of a dotted config path (list indices skipped)."""
    model: Any = PipelineConfig
    ann = None
    for part in path.split("."):
        if part.isdigit():
            continue
        ann = model.model_fields[part].annotation
        model = next((a for a in (ann, *typing.get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)),
                     None)
        if model is None:
            inner = [a for arg in typing.get_args(ann) for a in (arg, *typing.get_args(arg))
                     if isinstance(a, type) and issubclass(a, BaseModel)]
            model = inner[0] if inner else None
    return ann


def _candidates(path: str, value: Any, tmp: Path) -> list[Any]:
    """Other values for a leaf, most likely valid first."""
    ann = _annotation(path)
    args = typing.get_args(ann)
    literals = [a for a in args if not isinstance(a, type)] if typing.get_origin(ann) is typing.Literal else []
    if literals:
        return [a for a in literals if a != value]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value * 2, max(value - 1, 0)]
    if isinstance(value, float):
        return [round(value * 0.5, 6) if value else 0.5, round(value + 0.05, 6), value * 2 + 1]
    if isinstance(value, str):
        if ":" in value and "://" not in value:  # a function reference: another function
            return ["rlhf_core.data.tiny_task:prompt_topic"]
        if (tmp / "src").exists() and Path(value).exists():
            return [_changed_copy(Path(value), tmp / path)]
        return [value + "-changed", "s3://bucket/changed", "changed"]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
        return [[round(v * 0.9, 6) for v in value], [v + 1 for v in value]]  # betas, the split
    if isinstance(value, list):
        return [value + ["k_proj"], value[:1]]
    if isinstance(value, dict):
        return [{**value, "rlhf_test_key": 1}, {"prompt": "question", "chosen": "answer"}]
    if value is None:
        text = str(ann)
        out: list[Any] = []
        if "int" in text:
            out += [3, 200, 29500]
        if "float" in text:
            out += [0.5, 120.0]
        if "str" in text:
            out += ["changed", "0 3 * * *", str(_changed_copy(Path(__file__), tmp / path)),
                    "rlhf_core.data.tiny_task:gold_reward"]
        if "bool" in text:
            out += [True, False]
        return out
    raise AssertionError(f"no candidate for {path}={value!r}")


def _changed_copy(src: Path, dest: Path) -> str:
    """A copy of a file or folder with one file's bytes changed (a path whose content differs)."""
    if src.is_dir():
        shutil.copytree(src, dest)
        victim = sorted(p for p in dest.rglob("*") if p.is_file())[0]
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        victim = dest
    with open(victim, "a") as f:
        f.write("\n")
    return str(dest)


def _raw_tiny(root: Path) -> dict[str, Any]:
    base = tiny_config(root)
    return base.model_dump(mode="json")


def _mismatches(base_cfg: PipelineConfig, raw: dict[str, Any], tmp: Path) -> tuple[list[str], list[str], int]:
    """For every leaf: (stages whose key and view disagree about a change), (leaves no value could change),
    number of leaves tried."""
    base = _keys_and_views(base_cfg)
    (tmp / "src").mkdir(exist_ok=True)
    bad, untried = [], []
    leaves = sorted(leaf_paths(base_cfg))
    for path in leaves:
        value: Any = raw
        for part in path.split("."):
            value = value[int(part)] if part.isdigit() else value[part]
        for candidate in _candidates(path, value, tmp):
            try:  # a value the config refuses, or whose files cannot be keyed (an unknown source layout)
                changed = _keys_and_views(validate_config(apply_overrides(raw, {path: candidate})))
            except Exception:
                continue
            for name in registry.ORDER:
                key_changed = changed[name][0] != base[name][0]
                view_changed = changed[name][1] != base[name][1]
                if key_changed != view_changed:
                    bad.append(f"{path}={candidate!r}: {name} view changed {view_changed}, key changed {key_changed}")
            break
        else:
            untried.append(path)
    return bad, untried, len(leaves)


def test_every_leaf_changes_exactly_the_keys_of_the_stages_that_read_it(tmp_path):
    cfg = tiny_config(tmp_path / "store")
    bad, untried, n = _mismatches(cfg, _raw_tiny(tmp_path / "store"), tmp_path)
    assert bad == []
    # Every other leaf was changed to a valid value. These cannot change alone: a model is either pretrained
    # or built from an architecture; the source's layout decides its files; offloading needs ZeRO; several
    # processes need a multi-process launcher; step 3 needs a reward model or a reward function.
    alone = {"data.sources.0.name", "models.actor.name_or_path", "models.reward.name_or_path",
             "resources.nnodes", "resources.nproc_per_node", "reward.use_model"}  # the last needs reward.function
    alone |= {f"{s}.deepspeed.{f}" for s in ("sft", "reward", "rl.actor", "rl.critic")
              for f in ("offload_optimizer", "offload_params")}
    assert n > 150 and set(untried) <= alone, sorted(set(untried) - alone)


def test_unread_settings_change_no_key(tmp_path):
    """Where outputs are stored, how stages are launched, the schedule and the profile's name are not part of
    any stage's settings, so changing them reuses everything."""
    base = _keys_and_views(tiny_config(tmp_path / "a"))
    other = _keys_and_views(tiny_config(tmp_path / "b", **{
        "name": "renamed", "storage.lease_seconds": 60, "storage.checkpoints_to_keep": 5, "resources.cpu_threads": 2,
        "resources.launcher": "inprocess", "schedule.cron": "0 3 * * *", "resources.gpu_slots": 1}))
    assert {n: k for n, (k, _) in base.items()} == {n: k for n, (k, _) in other.items()}


def test_negative_control_a_key_that_misses_a_field_is_caught(tmp_path, monkeypatch):
    """If the payload dropped a field (sft.mask_prompt), the leaf sweep reports the SFT stage."""
    real = registry.key_payload

    def dropping(view, path="", parent=None, read=None):
        out = real(view, path, parent, read)
        if isinstance(out, dict) and path == "sft.":
            out.pop("mask_prompt", None)
        return out

    monkeypatch.setattr(registry, "key_payload", dropping)
    cfg = tiny_config(tmp_path / "store")
    base = _keys_and_views(cfg)
    flipped = _keys_and_views(tiny_config(tmp_path / "store", **{"sft.mask_prompt": not cfg.sft.mask_prompt}))
    assert flipped["sft"][1] != base["sft"][1] and flipped["sft"][0] == base["sft"][0]


def test_paths_count_by_content(tmp_path):
    from tests.conftest import PROJECT

    copy = tmp_path / "copy"
    shutil.copytree(PROJECT / "data" / "tiny_tokenizer", copy)
    base = tiny_config(tmp_path)
    moved = tiny_config(tmp_path, **{"models.actor.tokenizer": str(copy)})
    up = _fake_upstream()
    for name in (registry.DATA, registry.SFT):
        assert registry.key(name, base, up) == registry.key(name, moved, up)
    (copy / "tokenizer_config.json").write_text((copy / "tokenizer_config.json").read_text() + "\n")
    for name in (registry.DATA, registry.SFT):
        assert registry.key(name, base, up) != registry.key(name, moved, up)


def test_content_keyed_fields_are_marked_in_the_schema():
    from rlhf_core.config.schema import ModelSpec, PtxConfig, SourceConfig

    marked = {f"{cls.__name__}.{n}" for cls in (ModelSpec, PtxConfig, SourceConfig)
              for n, f in cls.model_fields.items() if f.json_schema_extra == CONTENT_KEYED}
    assert marked == {"ModelSpec.name_or_path", "ModelSpec.tokenizer", "PtxConfig.path", "SourceConfig.path",
                      "SourceConfig.eval_path"}


# ---------------------------------------------------------------------------------- (c) equal bytes


def _run_pipeline(cfg: PipelineConfig) -> dict[str, Manifest]:
    from tests.helpers import run_stage_here

    out: dict[str, Manifest] = {}
    for name in registry.ORDER:
        out[name] = run_stage_here(cfg, name, {up: out[up] for up in registry.inputs(name, cfg)})
    return out


def _files(m: Manifest) -> dict[str, str]:
    """Every file of an output with its hash (the metric logs included: they hold no wall-clock times)."""
    return {f.path: f.sha256 for f in m.files}


@pytest.mark.slow
def test_outputs_with_equal_keys_hold_equal_bytes(tmp_path):
    base = _run_pipeline(tiny_config(tmp_path / "base", **SMALL))
    variants = {"export.dtype": "bf16", "storage.checkpoints_to_keep": 1}
    for leaf, value in variants.items():
        other = _run_pipeline(tiny_config(tmp_path / leaf, **{**SMALL, leaf: value}))
        same = [n for n in registry.ORDER if base[n].key == other[n].key]
        for name in same:
            assert _files(base[name]) == _files(other[name]), f"{leaf}: {name} has one key and two contents"
        if leaf == "export.dtype":
            # Only the export and what reads it change; and their bytes really differ (the check can fail).
            assert same == [registry.DATA, registry.SFT, registry.REWARD, registry.RL]
            assert _files(base[registry.EXPORT]) != _files(other[registry.EXPORT])
        else:
            assert same == registry.ORDER
    assert Store.from_config(tiny_config(tmp_path / "base").storage).has_output(registry.EVALUATE, base["evaluate"].key)


def test_function_keyed_fields_are_marked_in_the_schema_and_views():
    from rlhf_core.config.schema import FUNCTION_KEYED, EvalConfig, RewardConfig
    from rlhf_core.config.views import RewardSignal, RLSettings

    marked = {f"{cls.__name__}.{n}" for cls in (EvalConfig, RewardConfig, RewardSignal, RLSettings)
              for n, f in cls.model_fields.items() if f.json_schema_extra == FUNCTION_KEYED}
    assert marked == {"EvalConfig.gold_reward", "RewardConfig.function", "RewardSignal.function", "RLSettings.gold_reward"}


def test_a_stages_inputs_follow_its_settings(tmp_path):
    """DPO (and a rule-based reward alone, without a critic) reads no reward model: its key does not change
    with the reward output, and its manifest names no reward input; PPO's does."""
    from rlhf_core.stages.launch import make_job

    up = _fake_upstream()
    other_reward = {**up, "reward": up["reward"].model_copy(update={"content_id": "another-reward-model"})}
    ppo = tiny_config(tmp_path)
    dpo = tiny_config(tmp_path, **{"rl.algorithm": "dpo"})
    rule = tiny_config(tmp_path, **{"rl.algorithm": "rloo", "rl.n_samples_per_prompt": 2, "reward.use_model": False,
                                    "reward.function": "rlhf_core.data.tiny_task:gold_reward"})
    assert registry.key("rl", ppo, up) != registry.key("rl", ppo, other_reward)
    for cfg in (dpo, rule):
        assert registry.inputs("rl", cfg) == ("data", "sft")
        assert registry.key("rl", cfg, up) == registry.key("rl", cfg, other_reward)
        assert set(make_job(cfg, "rl", registry.key("rl", cfg, up), up).upstream) == {"data", "sft"}
    with pytest.raises(ValueError, match="reads the outputs of reward under this config, but none was given"):
        make_job(ppo, "rl", "k", {k: v for k, v in up.items() if k != "reward"})
