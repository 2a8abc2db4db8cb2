"""Rule-based rewards: a Python function ``(prompt, answer) -> float`` named as "package.module:function"
(``reward.function`` in step 3, ``eval.gold_reward`` in evaluation; the bundled task's is
``rlhf_core.data.tiny_task:gold_reward``).

Importing the module runs its code in the worker: naming it in a profile is the user's explicit choice to
trust it, as with any Python package they install. The cache keys hold the module file's content
(``rlhf_core.storage.fingerprint.function_fingerprint``), so editing the rule re-runs what depends on it.
"""

from __future__ import annotations

import importlib
import math
from typing import Callable


class RewardFunctionError(ValueError):
    """A reward function that cannot be loaded, or that returned something other than a finite number."""


class RewardFunction:
    """A loaded rule: call it on lists of prompts and answers; every value is checked to be a finite number."""

    def __init__(self, spec: str, key: str):
        self.spec, self.key = spec, key
        self.fn = load_function(spec, key)

    def __call__(self, prompts: list[str], answers: list[str]) -> list[float]:
        out = []
        for i, (p, a) in enumerate(zip(prompts, answers)):
            value = self.fn(p, a)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RewardFunctionError(
                    f"{self.key} {self.spec} returned {value!r} for answer {i} ({a[:60]!r}); it must return a finite "
                    "float for every (prompt, answer)")
            out.append(float(value))
        return out


def load_function(spec: str, key: str) -> Callable[[str, str], float]:
    """Import ``module`` and return ``function`` of "module:function"; errors name ``key`` and the fix."""
    module, _, name = spec.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise RewardFunctionError(f"{key} {spec}: cannot import {module!r} ({e}); the module must be importable in "
                                  "the workers (on PYTHONPATH or installed)") from e
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise RewardFunctionError(f"{key} {spec}: module {module!r} has no function {name!r}")
    return fn
