"""The ``rlhf`` command.

    rlhf run --profile tiny [--set rl.kl.coef=0.05 ...] [--until STAGE] [--resume-from STAGE:step-N]
                                                           run the pipeline (finished stages are cache hits)
    rlhf config --profile tiny [--set ...]                 print the validated config
    rlhf profiles                                          the profiles and what each is for
    rlhf chat --model <store URL or path>                  chat with a trained actor
    rlhf eval --model PATH_OR_NAME [--profile tiny]        the evaluate stage's report for a model you bring
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


def cmd_profiles(args: argparse.Namespace) -> int:
    from rlhf_core.config import PROFILES_DIR, profile_purposes

    purposes = profile_purposes()
    width = max(map(len, purposes), default=0)
    for name, purpose in purposes.items():
        print(f"{name:{width}s}  {purpose}")
    print(f"\n(profiles in {PROFILES_DIR}; `rlhf config --profile NAME` prints one, `--profile FILE.yaml` takes your own)")
    return 0


def _with_server(cfg, checks, run):
    """Run flows the fast way: Prefect's temporary API server (unless PREFECT_API_URL names one) starts first,
    in a subprocess, while this process runs ``checks()`` and imports what the flows need; ``run()`` starts once
    it answers. The server goes when the command ends, however it ends."""
    from flows.environment import TemporaryServer, prefect_defaults

    if cfg.resources.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # no accelerator probing (and its warning) on CPU runs
    prefect_defaults()
    server = TemporaryServer.start_unless_configured()
    try:
        checks()
        if server is not None:
            server.wait()
        return run()
    finally:
        if server is not None:
            server.stop()


def cmd_run(args: argparse.Namespace) -> int:
    from rlhf_core.stages.preflight import preflight
    from rlhf_core.stages.registry import EVALUATE

    params = _params(args)
    cfg = params.config()  # validate before Prefect or any stage starts

    def run():
        if args.until == EVALUATE:
            from flows.pipeline import rlhf_pipeline

            return rlhf_pipeline(params)
        from flows.stage_flows import STAGE_FLOWS  # the stage's own flow: the pipeline up to and including it

        return STAGE_FLOWS[args.until](params)

    resume = None
    if args.resume_from:
        from rlhf_core.config import ConfigError
        from rlhf_core.stages.registry import ORDER, needed_for
        from rlhf_core.stages.rewind import parse_resume_from

        resume = parse_resume_from(args.resume_from)
        if ORDER.index(resume[0]) > ORDER.index(args.until):
            raise ConfigError(f"--resume-from {args.resume_from}: this run stops at {args.until}, before {resume[0]}")
        if resume[0] not in needed_for(args.until, cfg):
            raise ConfigError(f"--resume-from {args.resume_from}: with this config no stage up to {args.until} reads "
                              f"the {resume[0]} output (rl.algorithm dpo, reward.use_model or eval.reward_model), so "
                              "it does not run")

    from flows.environment import one_line_operational_failures, stop_at_once_on_interrupt

    def checks():
        preflight(cfg, args.until)  # the store, a reward.existing, the sources' files, a step without data
        if resume is not None:
            from rlhf_core.stages.rewind import rewind

            rewind(cfg, *resume, log=lambda msg: print(msg, file=sys.stderr))
        import flows.pipeline  # noqa: F401  (torch, transformers, prefect: imported while the server starts)

        one_line_operational_failures()  # Prefect's console handler exists now that it is imported

    stop_at_once_on_interrupt()
    _print_summary(_with_server(cfg, checks, run))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from rlhf_core.chat import Chat, repl

    try:
        chat = Chat(args.model, style=args.style, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                    temperature=args.temperature)
    except ValueError as e:  # a style the tokenizer cannot do, a bad --max-new-tokens
        print(f"rlhf: {e}", file=sys.stderr)
        return 2
    repl(chat)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from rlhf_core.config import ConfigError
    from rlhf_core.stages.preflight import preflight
    from rlhf_core.stages.registry import RL, SFT

    params = _params(args)
    cfg = params.config()
    model = _model_ref(args.model)
    name = args.name or os.path.basename(model.rstrip("/")) or "model"
    if name == SFT:
        raise ConfigError(f"--name {name!r} is the SFT actor's row; give the model another --name")
    out = os.path.abspath(args.out or f"rlhf-eval-{name}")

    def run():
        from flows.eval_model import eval_model_flow

        return eval_model_flow(params, model, name, out)

    table = _with_server(cfg, lambda: preflight(cfg, RL), run)
    metrics = list(table[SFT])
    print(f"\n{name} beside the profile's SFT actor ({len(table)} models, metrics of the evaluate stage):")
    print("  " + f"{'model':12s}" + "".join(f"{m:>18s}" for m in metrics))
    for row_name, row in table.items():
        print("  " + f"{row_name[:12]:12s}" + "".join(f"{row[m]:18.3f}" if m in row else f"{'n/a':>18s}" for m in metrics))
    print(f"\nreport  {os.path.join(out, 'report.md')}")
    return 0


def _model_ref(ref: str) -> str:
    """A model reference as given: a store URL or a local folder must exist (a relative one is taken from the
    working directory); anything else is a hub name.

    Raises:
        ConfigError: a URL or a path that is not there.
    """
    from rlhf_core.config import ConfigError
    from rlhf_core.config.profiles import resolve_path
    from rlhf_core.storage.fingerprint import exists

    ref = resolve_path(ref, "--model", hub_name_allowed=True)
    if ("://" in ref or os.path.isabs(ref)) and not exists(ref):
        raise ConfigError(f"--model {ref} does not exist; give an HF model folder, its store URL or a hub name")
    return ref


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
    run.add_argument("--resume-from", metavar="STAGE:step-N",
                     help="continue an unfinished training stage from its checkpoint at step N instead of its latest "
                     "(the later checkpoints are removed); e.g. rl:step-20")
    run.set_defaults(fn=cmd_run)
    with_profile(sub.add_parser("config", help="print the validated config")).set_defaults(fn=cmd_config)
    sub.add_parser("profiles", help="list the profiles and what each is for").set_defaults(fn=cmd_profiles)
    ev = with_profile(sub.add_parser("eval", help="evaluate a model you bring, with the evaluate stage's report"))
    ev.add_argument("--model", required=True, metavar="PATH_OR_NAME",
                    help="an HF model folder, its store URL (s3://..., file://...) or a hub name")
    ev.add_argument("--name", help="its row in the report (default: the folder's or hub name's last part)")
    ev.add_argument("--out", metavar="DIR", help="where report.md, metrics.json, samples.jsonl and plots/ go "
                    "(default: ./rlhf-eval-NAME)")
    ev.set_defaults(fn=cmd_eval)
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

    from rlhf_core.trainers.metrics import QUIET_PROGRESS

    for name, value in QUIET_PROGRESS.items():  # no third-party bars (chat and eval load models here)
        os.environ.setdefault(name, value)
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except Exception as e:
        # ModelLoadError's module imports torch; a command that never loaded a model (a cached run, config)
        # never imported it and cannot have raised it.
        loading = sys.modules.get("rlhf_core.models.loading")
        if isinstance(e, (ConfigError, DataError)) or (loading is not None and isinstance(e, loading.ModelLoadError)):
            print(f"rlhf: {e}", file=sys.stderr)
            return 2
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
