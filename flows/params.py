"""Flow parameters: a profile name plus typed overrides, so the Prefect UI shows a form.

The typed fields are the keys people change most; each maps onto dotted overrides of the profile. Any
other key goes into ``overrides`` (``{"rl.kl.coef": 0.05}``). Everything is validated by the same
``load_config`` as the CLI's ``--set``, so the form can never produce a config a profile could not.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from rlhf_core.config import ConfigError, PipelineConfig, load_config

# typed field -> the dotted overrides it sets ("{}" is replaced by the value)
_TYPED: dict[str, dict[str, Any]] = {
    "storage_root": {"storage.root": "{}"},
    "reward_existing": {"reward.existing": "{}"},
    # A pretrained model replaces a from-config one and brings its own tokenizer.
    "actor_name_or_path": {"models.actor.name_or_path": "{}", "models.actor.architecture": None,
                           "models.actor.tokenizer": None},
    "reward_name_or_path": {"models.reward.name_or_path": "{}", "models.reward.architecture": None,
                            "models.reward.tokenizer": None},
    "sft_max_steps": {"sft.max_steps": "{}"},
    "reward_max_steps": {"reward.max_steps": "{}"},
    "rl_max_steps": {"rl.max_steps": "{}"},
    "rl_kl_coef": {"rl.kl.coef": "{}"},
    "mixture_ptx_coef": {"mixture.ptx_coef": "{}"},
    "gpu_slots": {"resources.gpu_slots": "{}"},
}


class RunParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    profile: str = Field("tiny", description="Profile name from profiles/ (or a path to a YAML file).")
    storage_root: str | None = Field(None, description="storage.root: file://PATH or s3://BUCKET/PREFIX.")
    reward_existing: str | None = Field(
        None, description="reward.existing: use this reward model instead of training one (a key of the store, "
        "or the URL of a reward output folder)."
    )
    actor_name_or_path: str | None = Field(
        None, description="models.actor.name_or_path: hub name, path or URL of a pretrained actor."
    )
    reward_name_or_path: str | None = Field(
        None, description="models.reward.name_or_path: hub name, path or URL of the reward model's base."
    )
    sft_max_steps: int | None = Field(None, ge=1, description="sft.max_steps")
    reward_max_steps: int | None = Field(None, ge=1, description="reward.max_steps")
    rl_max_steps: int | None = Field(None, ge=1, description="rl.max_steps")
    rl_kl_coef: float | None = Field(None, ge=0, description="rl.kl.coef: initial KL coefficient (beta).")
    mixture_ptx_coef: float | None = Field(None, ge=0, description="mixture.ptx_coef: pretraining-loss weight in PPO.")
    gpu_slots: int | None = Field(None, ge=0, description="resources.gpu_slots: slots of rlhf-gpu a training stage holds.")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Any other dotted key, e.g. {'rl.kl.coef': 0.05, 'data.sources.0.weight': 2}."
    )

    def all_overrides(self) -> dict[str, Any]:
        """``overrides`` plus what the typed fields set.

        Raises:
            ConfigError: a typed field and ``overrides`` set one key to two values.
        """
        out = dict(self.overrides)
        for name, keys in _TYPED.items():
            value = getattr(self, name)
            if value is None:
                continue
            for key, template in keys.items():
                v = value if template == "{}" else template
                if key in out and out[key] != v:
                    raise ConfigError(f"{name}={value!r} and overrides[{key!r}]={out[key]!r} disagree; set one of them")
                out[key] = v
        return out

    def config(self) -> PipelineConfig:
        return load_config(self.profile, self.all_overrides())

    def run_name(self) -> str:
        try:
            shown = {k: v for k, v in self.all_overrides().items() if v is not None}
        except ConfigError:  # the flow reports it when it loads the config; a name must not fail first
            shown = dict(self.overrides)
        suffix = ",".join(f"{k}={v}" for k, v in sorted(shown.items()))
        return f"{self.profile}" + (f" [{suffix}]" if suffix else "")


def flow_run_name(prefix: str) -> str:
    """A flow run's name from its parameters, e.g. ``sft: tiny [rl.kl.coef=0.05]`` (Prefect calls this)."""
    from prefect.runtime import flow_run

    params = RunParams.model_validate(flow_run.parameters.get("params") or {})
    return f"{prefix}: {params.run_name()}"
