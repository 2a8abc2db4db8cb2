"""Flow parameters: a profile name plus typed overrides, so the Prefect UI shows a form."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from rlhf_core.config import PipelineConfig, load_config


class RunParams(BaseModel):
    profile: str = Field("tiny", description="Profile name from profiles/ (or a path to a YAML file).")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Dotted keys to override, e.g. {'ppo.kl.coef': 0.05}."
    )

    def config(self) -> PipelineConfig:
        return load_config(self.profile, self.overrides)

    def run_name(self) -> str:
        suffix = ",".join(f"{k}={v}" for k, v in sorted(self.overrides.items()))
        return f"{self.profile}" + (f" [{suffix}]" if suffix else "")
