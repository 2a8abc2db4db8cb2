"""Model cards (README.md beside the weights): what a model is and where it came from.

Cards hold only what the output's cache key holds (settings, metrics computed from the training, upstream
content ids), never wall-clock times or store locations, so the same key gives byte-identical folders.
"""

from __future__ import annotations

from typing import Any


# Manifest metrics about the run rather than the model (wall clock, memory): never in a card.
RUN_FACTS = ("seconds", "_gib")


def model_card(title: str, base: str, about: str = "", metrics: dict[str, Any] | None = None) -> str:
    """A card: title, base model, a paragraph, and a metric table (numbers only; no timings, no resume
    history, which stay in the manifest)."""
    lines = [f"# {title}", "", f"Base: `{base}`. Trained by rlhf-flow.", ""]
    if about:
        lines += [about.strip(), ""]
    rows = {k: v for k, v in (metrics or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith(RUN_FACTS)}
    if rows:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in rows.items()]
    return "\n".join(lines) + "\n"


def base_name(spec) -> str:
    """How a model spec names its base: the hub name or path, or the architecture it was built from."""
    return spec.name_or_path or f"{spec.architecture.get('model_type')} built from config"
