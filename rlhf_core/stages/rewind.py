"""Resume a stage from a chosen checkpoint (``rlhf run --resume-from STAGE:step-N``).

A stage that did not finish resumes from its latest complete checkpoint. To go back to an earlier one (a
later checkpoint is suspect: the loss blew up after it, a disk filled while it was written), its later
checkpoints are removed, marker first, and the stage is run again: it continues from step N. The stage's
key is the config's, so its output is the one an uninterrupted run would have written (the checkpoints
hold everything: weights, optimizers, RNG streams, data positions; DESIGN.md "Cache keys and resume").

Refused, before anything is removed: a stage whose output is complete (nothing to resume), a step that
has no complete checkpoint (the ones there are listed), a stage another run is producing right now (its
lease is live: neither expired nor held by a process that is gone from this machine, with its workers),
and a stage whose inputs are not complete yet (its key is not known).
"""

from __future__ import annotations

import re

from rlhf_core.config import ConfigError, PipelineConfig
from rlhf_core.stages import registry
from rlhf_core.stages.existing import existing_reward
from rlhf_core.storage.lease import lease_path, read_record
from rlhf_core.storage.store import Manifest, Store

_SPEC = re.compile(r"^(?P<stage>[a-z]+):(step-)?(?P<step>\d+)$")
TRAINING = (registry.SFT, registry.REWARD, registry.RL)  # the stages that write checkpoints


def parse_resume_from(text: str) -> tuple[str, int]:
    """``'rl:step-20'`` (or ``'rl:20'``) -> ``('rl', 20)``.

    Raises:
        ConfigError: another form, or a stage without checkpoints.
    """
    m = _SPEC.match(text.strip())
    if not m:
        raise ConfigError(f"--resume-from {text!r} must look like STAGE:step-N, e.g. rl:step-20")
    stage, step = m.group("stage"), int(m.group("step"))
    if stage not in TRAINING:
        raise ConfigError(f"--resume-from {text!r}: {stage!r} has no checkpoints; the training stages are "
                          f"{', '.join(TRAINING)}")
    return stage, step


def stage_key(cfg: PipelineConfig, stage: str, store: Store) -> str:
    """The key ``stage`` has for ``cfg``, from the complete outputs of the stages it is made from.

    Raises:
        ConfigError: an input is not complete in the store yet.
    """
    found: dict[str, Manifest] = {}
    need = registry.needed_for(stage, cfg)
    for name in registry.ORDER:
        if name not in need:
            continue
        upstream = {u: found[u] for u in registry.inputs(name, cfg)}
        existing = existing_reward(cfg) if name == registry.REWARD else None
        key = existing[1].key if existing else registry.key(name, cfg, upstream)
        if name == stage:
            return key
        manifest = store.read_manifest(name, key)
        if manifest is None:
            raise ConfigError(f"--resume-from {stage}: its input {name} ({name}/{key}) is not complete in "
                              f"{store.url}, so {stage} has not started and has no checkpoints for this config")
        found[name] = manifest
    raise AssertionError(f"{stage} is not in the registry's order")


def rewind(cfg: PipelineConfig, stage: str, step: int, log=print) -> list[int]:
    """Make checkpoint ``step`` the latest of ``stage`` (for ``cfg``): remove its later checkpoints. Returns
    the steps removed.

    Raises:
        ConfigError: the output is complete, the step has no complete checkpoint, or a run holds the stage.
    """
    store = Store.from_config(cfg.storage)
    key = stage_key(cfg, stage, store)
    where = store.url_of(stage, key)
    if store.has_output(stage, key):
        raise ConfigError(f"--resume-from {stage}:step-{step}: {where} is complete, so there is nothing to resume; "
                          "to train it again, delete it first (rlhf store gc, or remove the folder)")
    steps = store.list_checkpoints(stage, key)
    if step not in steps:
        have = ", ".join(f"step-{s}" for s in steps) or "none"
        raise ConfigError(f"--resume-from {stage}:step-{step}: {where}/checkpoints has no complete checkpoint at step "
                          f"{step} (complete: {have}; storage.checkpoints_to_keep keeps the last few)")
    holder = read_record(store, lease_path(store, stage, key))
    if holder is not None and not holder.breakable():  # a holder gone from this machine holds nothing
        raise ConfigError(f"--resume-from {stage}:step-{step}: another run is producing {where} now "
                          f"({holder.describe()}); wait for it or stop it first")
    later = [s for s in steps if s > step]
    store.drop_checkpoints_after(stage, key, step)
    if later:
        log(f"rlhf: {stage} resumes from checkpoint step {step}: removed the later "
            f"{', '.join(f'step-{s}' for s in later)} of {where}")
    return later
