"""Model cards (README.md beside the weights): what a model is and where it came from.

A card opens with the Hugging Face metadata header (YAML front matter: ``library_name``, ``tags``,
``base_model`` and ``datasets`` where they are hub names, and a ``model-index`` with the model's
evaluation results), then a title, the base, a paragraph and a metric table.

Cards hold only what the output's cache key holds (settings, metrics computed from the training, upstream
content ids), never wall-clock times or store locations, so the same key gives byte-identical folders: a
local model or dataset is named by its content, not by its path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

# Manifest metrics about the run rather than the model (wall clock, memory): never in a card.
RUN_FACTS = ("seconds", "_gib")
LIBRARY = "transformers"
TAG = "rlhf-flow"
# Data source adapters that are not hub datasets (their rows come from the user's files).
LOCAL_ADAPTERS = ("files", "local/jsonfile")


@dataclass(frozen=True)
class CardMeta:
    """The metadata header of a card. ``results``: metric key in the card's metrics -> (model-index metric
    type, its readable name); only the keys with a number in the metrics are listed."""

    task: tuple[str, str] = ("text-generation", "Text generation")  # (model-index task type, its name)
    base_model: str | None = None
    datasets: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    results: dict[str, tuple[str, str]] = field(default_factory=dict)


def model_card(title: str, base: str, about: str = "", metrics: dict[str, Any] | None = None,
               meta: CardMeta | None = None) -> str:
    """A card: the metadata header, title, base model, a paragraph, and a metric table (numbers only; no
    timings, no resume history, which stay in the manifest)."""
    rows = {k: v for k, v in (metrics or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith(RUN_FACTS)}
    lines = [front_matter(title, meta or CardMeta(), rows), f"# {title}", "", f"Base: `{base}`. Trained by rlhf-flow.", ""]
    if about:
        lines += [about.strip(), ""]
    if rows:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in rows.items()]
    return "\n".join(lines) + "\n"


def front_matter(title: str, meta: CardMeta, metrics: dict[str, float]) -> str:
    """The Hugging Face metadata header (``---`` YAML ``---``), keys in a fixed order."""
    import yaml

    header: dict[str, Any] = {}
    if meta.base_model:
        header["base_model"] = meta.base_model
    if meta.datasets:
        header["datasets"] = list(meta.datasets)
    header["library_name"] = LIBRARY
    header["tags"] = [TAG, *meta.tags]
    found = [{"type": kind, "name": name, "value": round(float(metrics[key]), 6)}
             for key, (kind, name) in meta.results.items() if key in metrics]
    if found:
        dataset = {"type": meta.datasets[0], "name": ", ".join(meta.datasets)} if meta.datasets else \
            {"type": "rlhf-flow-data", "name": "rlhf-flow data stage output"}
        header["model-index"] = [{"name": title, "results": [{
            "task": {"type": meta.task[0], "name": meta.task[1]},
            "dataset": {**dataset, "split": "held-out"},
            "metrics": found}]}]
    return "---\n" + yaml.safe_dump(header, sort_keys=False, allow_unicode=True, width=1000) + "---\n"


def card_metadata(text: str) -> dict[str, Any]:
    """The metadata header of a card's text ({} when it has none)."""
    import yaml

    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---\n", 4)
    return (yaml.safe_load(text[4:end]) or {}) if end > 0 else {}


def is_hub_name(ref: str | None) -> bool:
    """A model reference that names a hub repository (``facebook/opt-1.3b``), not a local path or a URL (the
    config made every local path absolute when it was loaded: rlhf_core/config/profiles.py)."""
    return bool(ref) and "://" not in ref and not os.path.isabs(ref) and not ref.startswith((".", "~"))


def hub_datasets(data_config: dict[str, Any]) -> tuple[str, ...]:
    """The hub dataset names among a data output's sources (its manifest's ``config``); sources read from
    the user's own files in a generic layout have none."""
    names = [s["name"] for s in data_config.get("data", {}).get("sources", [])
             if s.get("name") and "/" in s["name"] and s["name"] not in LOCAL_ADAPTERS]
    return tuple(dict.fromkeys(names))


def base_name(spec) -> str:
    """How a model spec names its base: the hub name, a local model by its content (its path differs from
    machine to machine, its bytes do not), or the architecture it was built from."""
    if spec.name_or_path is None:
        return f"{spec.architecture.get('model_type')} built from config"
    if is_hub_name(spec.name_or_path):
        return spec.name_or_path
    from rlhf_core.storage.fingerprint import reference_fingerprint

    return f"a local model (content {reference_fingerprint(spec.name_or_path)[:12]})"


def hub_base(spec) -> str | None:
    """The ``base_model`` of a card: the spec's hub name, if it has one."""
    return spec.name_or_path if is_hub_name(spec.name_or_path) else None
