"""Resume checkpoints without pickle: tensors in safetensors, structure in JSON.

DeepSpeed's own save/load logic (ZeRO partitions, optimizer, LR scheduler) is kept; only its file format is
replaced. Every state dict DeepSpeed writes goes through ``SafeCheckpointEngine``: tensors go to
``<file>.safetensors``, everything else to ``<file>`` as tagged JSON. Loading never executes code from the
checkpoint: the only classes it rebuilds are DeepSpeed's own (an allowlist by module), by setting fields.

The trainer's own state (RNG streams, data position, metric history, EMA weights) goes through the same
``save_tree`` / ``load_tree`` pair, one file per rank.
"""

from __future__ import annotations

import enum
import importlib
import json
import math
import os
import random
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

TENSORS_SUFFIX = ".safetensors"
_ALLOWED_MODULES = ("deepspeed.",)


class CheckpointFormatError(ValueError):
    pass


# --------------------------------------------------------------------------------------- tree encoding


def _encode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor": name}
    if isinstance(obj, enum.Enum):  # before int: DeepSpeed's ZeroStageEnum is an IntEnum
        return {"__enum": _class_path(obj, where), "value": _encode(obj.value, tensors, where)}
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float": repr(obj)}
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return _encode(obj.item(), tensors, where)
    if isinstance(obj, np.ndarray):
        # Unsigned arrays (numpy's RNG key) travel as int64: not every torch build stores uint32.
        arr = obj.astype(np.int64) if obj.dtype.kind == "u" else obj.copy()
        return {"__ndarray": _encode(torch.from_numpy(arr), tensors, where), "dtype": str(obj.dtype)}
    if isinstance(obj, torch.Size):
        return {"__size": list(obj)}
    if isinstance(obj, torch.dtype):
        return {"__dtype": str(obj).removeprefix("torch.")}
    if isinstance(obj, torch.device):
        return {"__device": str(obj)}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return {"__ntuple": _class_path(obj, where), "values": [_encode(v, tensors, where) for v in obj]}
    if isinstance(obj, (list, tuple, set)):
        tag = {list: "__list", tuple: "__tuple", set: "__set"}[type(obj)]
        return {tag: [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, dict):
        tag = "__odict" if isinstance(obj, OrderedDict) else "__dict"
        return {tag: [[_encode(k, tensors, where), _encode(v, tensors, f"{where}/{k}")] for k, v in obj.items()]}
    if hasattr(obj, "__dict__"):
        return {"__obj": _class_path(obj, where), "state": _encode(dict(vars(obj)), tensors, where)}
    raise CheckpointFormatError(f"cannot store {type(obj).__name__} at {where or '/'} in a checkpoint")


def _class_path(obj: Any, where: str) -> str:
    cls = type(obj)
    path = f"{cls.__module__}.{cls.__qualname__}"
    if not path.startswith(_ALLOWED_MODULES):
        raise CheckpointFormatError(f"cannot store {path} at {where or '/'}: only DeepSpeed's own classes are allowed")
    return path


def _resolve(path: str) -> type:
    if not path.startswith(_ALLOWED_MODULES):
        raise CheckpointFormatError(f"checkpoint names class {path}, which is not allowed")
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if not isinstance(obj, dict):
        return obj
    if "__tensor" in obj:
        return tensors[obj["__tensor"]]
    if "__float" in obj:
        return float(obj["__float"])
    if "__ndarray" in obj:
        return _decode(obj["__ndarray"], tensors).numpy().astype(obj["dtype"])
    if "__size" in obj:
        return torch.Size(obj["__size"])
    if "__dtype" in obj:
        return getattr(torch, obj["__dtype"])
    if "__device" in obj:
        return torch.device(obj["__device"])
    if "__enum" in obj:
        return _resolve(obj["__enum"])(_decode(obj["value"], tensors))
    if "__ntuple" in obj:
        return _resolve(obj["__ntuple"])(*[_decode(v, tensors) for v in obj["values"]])
    for tag, kind in (("__list", list), ("__tuple", tuple), ("__set", set)):
        if tag in obj:
            return kind(_decode(v, tensors) for v in obj[tag])
    if "__dict" in obj or "__odict" in obj:
        kind = OrderedDict if "__odict" in obj else dict
        return kind((_decode(k, tensors), _decode(v, tensors)) for k, v in obj.get("__dict", obj.get("__odict")))
    if "__obj" in obj:
        cls = _resolve(obj["__obj"])
        inst = cls.__new__(cls)
        inst.__dict__.update(_decode(obj["state"], tensors))
        return inst
    raise CheckpointFormatError(f"unknown entry in checkpoint: {sorted(obj)}")


def save_tree(obj: Any, path: str) -> None:
    """Write ``obj`` (nested dicts/lists of tensors and plain values) to ``path`` + ``path.safetensors``."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(obj, tensors, "")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file(tensors, path + TENSORS_SUFFIX)
    with open(path, "w") as f:
        json.dump({"format": "rlhf-tree/1", "tree": skeleton}, f)


def load_tree(path: str) -> Any:
    with open(path) as f:
        doc = json.load(f)
    if doc.get("format") != "rlhf-tree/1":
        raise CheckpointFormatError(f"{path} is not an rlhf-tree checkpoint file")
    tensors = load_file(path + TENSORS_SUFFIX, device="cpu")
    return _decode(doc["tree"], tensors)


# --------------------------------------------------------------------------------- DeepSpeed file hook


def _deepspeed_engine_base():
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    return CheckpointEngine


class SafeCheckpointEngine(_deepspeed_engine_base()):  # type: ignore[misc]
    """A DeepSpeed checkpoint engine that writes safetensors + JSON instead of torch.save pickles."""

    def __init__(self, config_params=None):
        super().__init__(config_params)
        self.name = "SafeCheckpointEngine"

    def create(self, info) -> None:
        pass

    def save(self, state_dict, path: str) -> None:
        save_tree(state_dict, path)

    def load(self, path: str, map_location=None):
        return load_tree(path)

    def commit(self, info) -> bool:
        return True

    def preserves_storage_sharing(self) -> bool:
        return False  # DeepSpeed clones views before saving; safetensors refuses shared storage


# ------------------------------------------------------------------------------------------ RNG state


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
