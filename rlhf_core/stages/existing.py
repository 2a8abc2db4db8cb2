"""A reward model trained elsewhere (``reward.existing``), so that many actor runs share one.

``reward.existing`` names a complete reward output by key (in this store) or by the URL of its folder
(``file://...`` or ``s3://.../reward/<key>``, in this store or another). An output in another store is
imported: its files are copied into this store under the same key, each checked against the manifest's
size and SHA-256, and the original manifest is written last (with ``producer.imported_from``). From then on
PPO, evaluation, ``rlhf store`` and gc treat it like a reward model trained here, and the PPO key (which
depends on the reward output's content id, not its location) is the same as in the source store.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

from pydantic import ValidationError

from rlhf_core.stages import registry as stages
from rlhf_core.config import ConfigError, PipelineConfig
from rlhf_core.storage.store import MANIFEST, Manifest, Store


def existing_reward(cfg: PipelineConfig) -> tuple[Store, Manifest] | None:
    """The store folder and manifest that ``reward.existing`` names, or None when it is not set.

    Raises:
        ConfigError: nothing complete is there, or it is not a reward output; the message names the URL.
    """
    ref = cfg.reward.existing
    if ref is None:
        return None
    if "://" not in ref:
        store = Store.from_config(cfg.storage)
        manifest = store.read_manifest(stages.REWARD, ref)
        if manifest is None:
            raise ConfigError(
                f"reward.existing {ref!r}: {store.url_of(stages.REWARD, ref)} holds no complete reward output; "
                "`rlhf store ls --stage reward` lists the reward models of this store (or give a URL)"
            )
        return Store(store.url_of(stages.REWARD, ref), cfg.storage.endpoint_url), manifest
    source = Store(ref, cfg.storage.endpoint_url)
    try:
        manifest = Manifest.model_validate_json(source.fs.cat_file(source.path(MANIFEST)))
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError(
            f"reward.existing {ref!r}: there is no {MANIFEST} at {ref}/{MANIFEST}; give the folder of a complete "
            "reward output, e.g. s3://bucket/prefix/reward/<key> (`rlhf store ls --stage reward` in that store)"
        ) from None
    except PermissionError as e:
        raise ConfigError(f"reward.existing {ref!r}: not allowed to read it ({e}); check the credentials") from None
    except ValidationError as e:
        raise ConfigError(f"reward.existing {ref!r}: {ref}/{MANIFEST} is not a stage manifest ({e.error_count()} errors)") from None
    if manifest.stage != stages.REWARD:
        raise ConfigError(f"reward.existing {ref!r} is a {manifest.stage!r} output, not a reward model")
    _check_no_conflict(source, manifest, Store.from_config(cfg.storage))
    return source, manifest


def _check_no_conflict(source: Store, manifest: Manifest, store: Store) -> Manifest | None:
    local = store.read_manifest(stages.REWARD, manifest.key)
    if local is not None and local.content_id != manifest.content_id:
        raise ConfigError(
            f"reward.existing {source.url}: {store.url_of(stages.REWARD, manifest.key)} already holds a reward "
            f"model with the same key and other content ({local.content_id[:12]} vs {manifest.content_id[:12]}); "
            f"use reward.existing={manifest.key} for that one, or delete it (`rlhf store gc`) to import this one"
        )
    return local


def import_reward(source: Store, manifest: Manifest, store: Store, producer: dict[str, Any] | None = None) -> Manifest:
    """Make ``manifest``'s output (in the folder ``source``) complete in ``store`` under its own key.

    Returns the manifest in ``store``: the existing one when it is already there, else the copy.

    Raises:
        ConfigError: ``store`` already holds an output under that key with other content.
        ValueError: a source file does not match the manifest (nothing becomes visible).
    """
    local = _check_no_conflict(source, manifest, store)
    if local is not None:
        return local
    imported = {"imported_from": source.url, "imported_at": _now(), "imported_by": dict(producer or {})}
    with store.open_output(stages.REWARD, manifest.key) as out:
        for f in manifest.files:
            out.copy_in(source, f.path, f)
        return out.commit_copy(manifest, imported)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")
