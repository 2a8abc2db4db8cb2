"""``rlhf serve``: deployments of the pipeline and of every stage flow, served from this process.

    rlhf serve [--profile P] [--set K=V ...] [--cron "0 3 * * *" | --interval SECONDS] [--gpus N] [--limit N]

Each flow (rlhf-pipeline, rlhf-data, rlhf-sft, rlhf-reward, rlhf-rl, rlhf-export, rlhf-evaluate) gets a
deployment named after the profile whose parameters are a ``RunParams`` form (profile, typed fields,
free overrides), prefilled from the command line. The schedule (the profile's ``schedule`` section, or
``--cron`` / ``--interval``) goes on the pipeline's deployment. ``--gpus N`` sizes the ``rlhf-gpu``
concurrency limit that training stages take slots from (default: created with this machine's GPU count if
it does not exist yet; an existing limit is left as it is).
"""

from __future__ import annotations

import argparse
import datetime
import os
from pathlib import Path
from typing import Any, Callable

from flows.environment import prefect_defaults
from flows.params import RunParams
from rlhf_core.config import ConfigError, PipelineConfig


def schedules(cfg: PipelineConfig, cron: str | None = None, interval: float | None = None) -> list[Any]:
    """The pipeline deployment's schedules: the command line's, else the profile's, else none."""
    from prefect.schedules import Cron, Interval

    if cron is not None and interval is not None:
        raise ConfigError("give --cron or --interval, not both")
    where = "--cron" if cron is not None else "--interval" if interval is not None else "the profile's schedule"
    if cron is None and interval is None:
        cron, interval = cfg.schedule.cron, cfg.schedule.interval_seconds
    if interval is not None and interval < 60:
        raise ConfigError(f"--interval {interval}: runs of a training pipeline need at least 60 seconds between them")
    try:
        if cron is not None:
            return [Cron(cron, timezone=cfg.schedule.timezone)]
        if interval is not None:
            return [Interval(datetime.timedelta(seconds=interval), timezone=cfg.schedule.timezone)]
    except ValueError as e:  # Prefect's own check of the cron string and the time zone
        raise ConfigError(f"{where}: {e}; a cron has 5 fields (minute hour day month weekday), e.g. '0 3 * * *'") from None
    return []


def flows() -> list[Any]:
    from flows.pipeline import rlhf_pipeline
    from flows.stage_flows import STAGE_FLOWS

    return [rlhf_pipeline, *STAGE_FLOWS.values()]


def build_deployments(params: RunParams, cfg: PipelineConfig, cron: str | None = None,
                      interval: float | None = None) -> list[Any]:
    """One deployment per flow, named after the profile, with ``params`` as the form's defaults."""
    from prefect.deployments.runner import EntrypointType

    from flows.pipeline import rlhf_pipeline

    name = Path(params.profile).stem
    defaults = {"params": params.model_dump(mode="json", exclude_defaults=True) | {"profile": params.profile}}
    pipeline_schedules = schedules(cfg, cron, interval)
    out = []
    for f in flows():
        out.append(f.to_deployment(name=name, parameters=defaults, tags=["rlhf", name],
                                   entrypoint_type=EntrypointType.MODULE_PATH,  # any working directory
                                   schedules=pipeline_schedules if f is rlhf_pipeline else None,
                                   description=(f.description or "").strip().splitlines()[0]))
    return out


def cmd_serve(args: argparse.Namespace, make_params: Callable[[argparse.Namespace], RunParams]) -> int:
    from prefect import serve

    from rlhf_core.stages.existing import existing_reward
    from tasks.runner import GPU_LIMIT, gpu_count, ensure_gpu_limit

    params = make_params(args)
    cfg = params.config()  # a bad profile or override is refused before anything is served
    prefect_defaults()
    if cfg.resources.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # inherited by the flow runs this process starts
    existing_reward(cfg)
    deployments = build_deployments(params, cfg, args.cron, args.interval)
    if args.gpus is not None:
        print(f"{GPU_LIMIT}: {ensure_gpu_limit(args.gpus)} slots")
    elif gpu_count() > 0:
        print(f"{GPU_LIMIT}: {ensure_gpu_limit(None, at_least=gpu_count())} slots")
    serve(*deployments, limit=args.limit)
    return 0


def add_parser(sub: argparse._SubParsersAction, with_profile: Callable, make_params: Callable) -> None:
    p = with_profile(sub.add_parser("serve", help="serve deployments of the pipeline and each stage flow"))
    when = p.add_mutually_exclusive_group()
    when.add_argument("--cron", help="schedule the pipeline with a cron expression (default: the profile's schedule)")
    when.add_argument("--interval", type=float, metavar="SECONDS", help="schedule the pipeline every SECONDS")
    p.add_argument("--gpus", type=int, metavar="N",
                   help="set the rlhf-gpu concurrency limit to N slots (default: this machine's GPU count, if unset)")
    p.add_argument("--limit", type=int, default=None, help="at most this many flow runs at once in this process")
    p.set_defaults(fn=lambda args: cmd_serve(args, make_params))
