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
BUNDLED_DIR = PROJECT_ROOT / "data"  # what bundled://NAME names
BUNDLED = "bundled://"


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


def profile_purposes() -> dict[str, str]:
    """Every profile in the profiles folder with its one-line purpose: the first line of its header comment
    without the ``# name:`` in front (STYLE.md: a profile's header says what it is for)."""
    out = {}
    for path in sorted(PROFILES_DIR.glob("*.yaml")):
        first = next((line for line in path.read_text().splitlines() if line.strip()), "")
        purpose = first.lstrip("#").strip() if first.startswith("#") else ""
        head, sep, rest = purpose.partition(":")
        out[path.stem] = rest.strip() if sep and head.strip() == path.stem else purpose
    return out


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
    raw = _resolve_paths(raw)
    return validate_config(raw, source=f"profile {path.name}" + (" with overrides" if overrides else ""))


# The fields that name files, as (section path, field, what a missing relative name is). Their values are
# resolved here, once; cache keys hold the files' content (rlhf_core/stages/registry.py), so where the
# bytes lie never changes a key.
PATH_FIELDS: tuple[tuple[str, str, bool], ...] = (
    ("data.sources.*", "path", False), ("data.sources.*", "eval_path", False), ("data.ptx", "path", False),
    ("models.actor", "tokenizer", True), ("models.actor", "name_or_path", True),
    ("models.reward", "tokenizer", True), ("models.reward", "name_or_path", True),
)


def bundled_names() -> list[str]:
    """What ``bundled://NAME`` can name: the data shipped in the project's ``data/`` folder."""
    return sorted(p.name for p in BUNDLED_DIR.iterdir() if not p.name.startswith((".", "_")) and p.suffix != ".py")


def resolve_path(value: str | None, key: str, hub_name_allowed: bool = False, cwd: Path | None = None) -> str | None:
    """Where a path in a profile or override points.

    ``bundled://NAME``: the data bundled with rlhf-flow (``data/NAME`` of the project), from any working
    directory. A URL (``s3://``, ``file://``) or an absolute path: as it is. A relative path: against the
    working directory, as a shell would take it. For model and tokenizer fields, a relative name that does not
    exist there and does not start with ``.`` or ``~`` is a hub name (``facebook/opt-1.3b``) and stays one.

    Raises:
        ConfigError: a bundled name that is not bundled, or a relative path that does not exist, naming the
            key, the directory it was resolved against and the fix.
    """
    if value is None or not isinstance(value, str):
        return value
    if value.startswith(BUNDLED):
        name = value[len(BUNDLED):].strip("/")
        path = BUNDLED_DIR / name
        if not name or not path.exists():
            raise ConfigError(f"{key}: {value!r} is not bundled data: {BUNDLED_DIR} holds "
                              f"{', '.join(BUNDLED + n for n in bundled_names())}")
        return str(path)
    if "://" in value or os.path.isabs(value):
        return value
    if value.startswith("~"):
        return os.path.expanduser(value)
    base = Path(cwd or os.getcwd())
    path = base / value
    if path.exists():
        return str(path)
    if hub_name_allowed and not value.startswith("."):
        return value  # a hub name
    raise ConfigError(
        f"{key}: {value!r} does not exist: relative paths are resolved against the working directory {base} "
        f"(giving {path}); run from the folder that holds it, give an absolute path, or name data bundled with "
        f"rlhf-flow as bundled://NAME ({', '.join(bundled_names())})"
    )


def _resolve_paths(raw: dict[str, Any]) -> dict[str, Any]:
    """Resolve every path field of a raw config in place (``resolve_path``); returns it."""
    for section, field, hub in PATH_FIELDS:
        for where, node in _nodes(raw, section.split(".")):
            if isinstance(node, dict) and node.get(field) is not None:
                node[field] = resolve_path(node[field], f"{where}.{field}", hub_name_allowed=hub)
    return raw


def _nodes(node: Any, parts: list[str], where: str = "") -> list[tuple[str, Any]]:
    """The mappings at a dotted section path (``*``: every item of a list), with their dotted names."""
    if not parts:
        return [(where, node)]
    head, rest = parts[0], parts[1:]
    if head == "*":
        items = node if isinstance(node, list) else []
        return [n for i, item in enumerate(items) for n in _nodes(item, rest, f"{where}.{i}")]
    child = node.get(head) if isinstance(node, dict) else None
    return _nodes(child, rest, f"{where}.{head}" if where else head) if child is not None else []
