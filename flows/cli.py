"""The ``rlhf`` command.

    rlhf run --profile tiny [--set rl.kl.coef=0.05 ...] [--until STAGE]
                                                           run the pipeline (finished stages are cache hits)
    rlhf config --profile tiny [--set ...]                 print the validated config
    rlhf chat --model <store URL or path>                  chat with a trained actor
    rlhf serve --profile tiny [--cron ... | --interval S]   serve deployments (flows/serve.py)
    rlhf store ls|show KEY|gc --keep N                     the store's contents and lineage (flows/store_cli.py)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from typing import Any

from rlhf_core.config.schema import PromptFormat
from rlhf_core.stages.registry import ORDER


def _params(args: argparse.Namespace):
    from flows.params import RunParams
    from rlhf_core.config import parse_override

    return RunParams(profile=args.profile, overrides=dict(parse_override(s) for s in args.set or []))


def cmd_config(args: argparse.Namespace) -> int:
    cfg = _params(args).config()
    print(json.dumps(cfg.model_dump(mode="json"), indent=2))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from rlhf_core.stages.preflight import preflight
    from rlhf_core.stages.registry import EVALUATE

    params = _params(args)
    cfg = params.config()  # validate before Prefect or any stage starts
    preflight(cfg, args.until)  # the store, a reward.existing, the sources' files, a step without data
    if cfg.resources.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # no accelerator probing (and its warning) on CPU runs
    from flows.environment import (one_line_operational_failures, prefect_defaults, stop_at_once_on_interrupt,
                                   temporary_server_dies_with_this_process)

    prefect_defaults()
    stop_at_once_on_interrupt()
    temporary_server_dies_with_this_process()
    one_line_operational_failures()
    if args.until == EVALUATE:
        from flows.pipeline import rlhf_pipeline

        summary = rlhf_pipeline(params)
    else:  # the stage's own flow: the pipeline up to and including it
        from flows.stage_flows import STAGE_FLOWS

        summary = STAGE_FLOWS[args.until](params)
    _print_summary(summary)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from rlhf_core.chat import Chat, repl

    chat = Chat(args.model, style=args.style, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                temperature=args.temperature)
    repl(chat)
    return 0


def _print_summary(summary: dict[str, Any]) -> None:
    print("\nOutputs:")
    for stage, url in summary["outputs"].items():
        print(f"  {stage:9s} {url}")
    if summary.get("report"):
        print(f"  report    {summary['report']}")
    if summary.get("headline"):
        print("\nHeadline:")
        for k, v in summary["headline"].items():
            print(f"  {k}: {v}")
    if summary.get("sources"):
        print("\nData sources:")
        for k, v in summary["sources"].items():
            print(f"  {k}: {v}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rlhf", description="RLHF pipeline as cached, resumable Prefect stages")
    sub = ap.add_subparsers(dest="command", required=True)

    def with_profile(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--profile", default="tiny", help="profile name in profiles/ or a YAML path (default: tiny)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
        return p

    run = with_profile(sub.add_parser("run", help="run the pipeline"))
    run.add_argument("--until", choices=ORDER, default=ORDER[-1], metavar="STAGE",
                     help=f"run the pipeline up to and including this stage ({', '.join(ORDER)}; DeepSpeed-Chat's "
                     "--step); default: all")
    run.set_defaults(fn=cmd_run)
    with_profile(sub.add_parser("config", help="print the validated config")).set_defaults(fn=cmd_config)
    chat = sub.add_parser("chat", help="chat with a trained actor")
    chat.add_argument("--model", required=True, help="path or store URL of a model folder (e.g. <root>/export/<key>/final)")
    chat.add_argument("--style", choices=typing.get_args(PromptFormat), default="human_assistant",
                      help="DeepSpeed-Chat's Human/Assistant text, or the tokenizer's chat template")
    chat.add_argument("--max-new-tokens", type=int, default=128)
    chat.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    chat.add_argument("--temperature", type=float, default=1.0)
    chat.set_defaults(fn=cmd_chat)
    from flows import serve, store_cli

    serve.add_parser(sub, with_profile, _params)
    store_cli.add_parser(sub, with_profile, _params)
    return ap


def main(argv: list[str] | None = None) -> int:
    from rlhf_core.config import ConfigError
    from rlhf_core.data.adapters import DataError
    from rlhf_core.models.loading import ModelLoadError

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, DataError, ModelLoadError) as e:
        print(f"rlhf: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        message = _operational(e)
        if message is None:
            raise
        print(f"rlhf: {message}", file=sys.stderr)
        return 1


def _operational(e: Exception) -> str | None:
    """One line for a run that failed for an operational reason (its store cannot be reached, a stage worker
    exited), or None for anything else (a bug: its traceback is wanted). Imports nothing: a command that never
    loaded those modules cannot have raised their errors."""
    store, runner = sys.modules.get("rlhf_core.storage.store"), sys.modules.get("tasks.runner")
    if store is not None and isinstance(e, store.StoreUnavailable):
        return str(e)
    if runner is not None and isinstance(e, runner.StageFailed):  # the worker's output is in the log above
        return (f"{str(e).splitlines()[0]} (its output is above); after a fix, run the same command again: "
                "finished stages are kept and this one resumes from its latest complete checkpoint")
    return None


if __name__ == "__main__":
    sys.exit(main())
