"""Profiles: loading a YAML profile, dotted overrides, validation with messages that name the key.

A profile (``profiles/<name>.yaml``) is a complete :class:`PipelineConfig`. Overrides (``rl.kl.coef=0.05``)
are applied to the raw mapping and the whole config is validated again, so an override can never produce a
config that a profile could not.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from rlhf_core.config.schema import ConfigError, PipelineConfig

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PROFILES_DIR = Path(os.environ.get("RLHF_PROFILES_DIR", PROJECT_ROOT / "profiles"))


def profile_path(profile: str) -> Path:
    """Resolve a profile name (``tiny``) or a path to a YAML file."""
    p = Path(profile)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidate = PROFILES_DIR / f"{profile}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(f.stem for f in PROFILES_DIR.glob("*.yaml"))
    raise ConfigError(f"unknown profile {profile!r}: known profiles are {', '.join(known)} (or give a .yaml path)")


def parse_override(text: str) -> tuple[str, Any]:
    """``'rl.kl.coef=0.05'`` -> ``('rl.kl.coef', 0.05)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from e
    return key, value


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a copy of a raw config mapping, checking each key against the models.

    List entries are addressed by index: ``data.sources.0.weight=2``.
    """
    import copy

    out = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        _check_key(parts, dotted)
        node: Any = out
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                node = _list_item(node, part, ".".join(parts[:i]), dotted)
                continue
            if not isinstance(node.get(part), (dict, list)):
                node[part] = {}
            node = node[part]
        if isinstance(node, list):
            idx = int(parts[-1]) if parts[-1].isdigit() else -1
            _list_item(node, parts[-1], ".".join(parts[:-1]), dotted)
            node[idx] = value
        else:
            node[parts[-1]] = value
    return out


def _list_item(node: list, part: str, where: str, dotted: str) -> Any:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {dotted!r}: {where} is a list of {len(node)} entries; index it with 0..{len(node) - 1}")
    return node[int(part)]


_FREEFORM = {"extra", "architecture", "columns"}


def _check_key(parts: list[str], dotted: str) -> None:
    """Raise ConfigError unless ``parts`` is a field path of PipelineConfig."""
    import typing

    model: type[BaseModel] | None = PipelineConfig
    i = 0
    while i < len(parts):
        part = parts[i]
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(f"unknown key {dotted!r}: {where} has {', '.join(sorted(fields))}")
        annotation = fields[part].annotation
        i += 1
        if part in _FREEFORM or i == len(parts):
            return  # a free-form mapping (anything below goes) or the leaf itself
        if typing.get_origin(annotation) is list:
            if not parts[i].isdigit():
                raise ConfigError(f"unknown key {dotted!r}: {'.'.join(parts[:i])} is a list; index it like {'.'.join(parts[:i])}.0")
            i += 1
            if i == len(parts):
                return
        model = _submodel(annotation)
        if model is None:
            raise ConfigError(f"unknown key {dotted!r}: {'.'.join(parts[:i])} is a value, not a section")


def _submodel(annotation: Any) -> type[BaseModel] | None:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def validate_config(raw: dict[str, Any], source: str = "config") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif err["type"] == "literal_error":
                msg = f"{msg}, got {err.get('input')!r}"
            lines.append(f"  {loc}: {msg}")
        raise ConfigError(f"{source} is invalid:\n" + "\n".join(lines)) from None


def load_config(profile: str, overrides: dict[str, Any] | list[str] | None = None) -> PipelineConfig:
    """Load a profile and apply overrides (a mapping, or ``key=value`` strings)."""
    path = profile_path(profile)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"profile {path} is not valid YAML: {e}") from e
    if isinstance(overrides, list):
        overrides = dict(parse_override(o) for o in overrides)
    raw = apply_overrides(raw, overrides or {})
    raw = _resolve_relative_paths(raw, base=PROJECT_ROOT)
    return validate_config(raw, source=f"profile {path.name}" + (" with overrides" if overrides else ""))


def _resolve_relative_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Bundled-data paths in profiles (``data/...``) are relative to the project root, not the cwd."""

    def fix(p: str | None) -> str | None:
        if p and "://" not in p and not os.path.isabs(p) and p.startswith("data/"):
            return str(base / p)
        return p

    data = raw.get("data") or {}
    for src in data.get("sources") or []:
        if isinstance(src, dict):
            for k in ("path", "eval_path"):
                if k in src:
                    src[k] = fix(src[k])
    if isinstance(data.get("ptx"), dict) and "path" in data["ptx"]:
        data["ptx"]["path"] = fix(data["ptx"]["path"])
    for role in ("actor", "reward"):
        spec = (raw.get("models") or {}).get(role)
        if isinstance(spec, dict):
            for k in ("tokenizer", "name_or_path"):
                if k in spec:
                    spec[k] = fix(spec[k])
    return raw


