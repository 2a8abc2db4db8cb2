"""``rlhf store``: what is in the store, where each output came from, and garbage collection.

    rlhf store ls [--stage S]                   complete outputs: size, created, flow run, upstream, headline
    rlhf store show KEY                         one output: files, metrics, upstream chain, downstream users
    rlhf store gc --keep N [--dry-run]          remove what the N most recent results do not refer to

The store is the profile's ``storage.root`` (``--profile``, ``--set storage.root=...``) or ``--root URL``.
The logic is in rlhf_core/stages/lineage.py.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from rlhf_core.stages import lineage
from rlhf_core.storage.store import Store


def _store(args: argparse.Namespace, make_params: Callable) -> tuple[Store, float]:
    cfg = make_params(args).config()
    root = args.root or cfg.storage.root
    return Store(root, cfg.storage.endpoint_url), cfg.storage.lease_seconds


def cmd_store(args: argparse.Namespace, make_params: Callable) -> int:
    store, lease_seconds = _store(args, make_params)
    try:
        if args.store_command == "ls":
            print(lineage.ls(store, args.stage))
        elif args.store_command == "show":
            print(lineage.show(store, args.key))
        else:
            if args.keep < 0:
                print(f"rlhf store gc: --keep must be >= 0, got {args.keep}", file=sys.stderr)
                return 2
            grace = lease_seconds if args.grace is None else args.grace
            plan = lineage.plan_gc(store, args.keep, grace_seconds=grace, include_partial=args.include_partial)
            print(plan.describe(store))
            if args.dry_run:
                print("dry run: nothing deleted")
            else:
                removed = lineage.apply_gc(store, plan)
                print(f"deleted {len(removed)} outputs")
    except KeyError as e:
        print(f"rlhf store: {e.args[0]}", file=sys.stderr)
        return 2
    return 0


def add_parser(sub: argparse._SubParsersAction, with_profile: Callable, make_params: Callable) -> None:
    p = sub.add_parser("store", help="list, inspect and garbage-collect the store")
    verbs = p.add_subparsers(dest="store_command", required=True)

    def common(q: argparse.ArgumentParser) -> argparse.ArgumentParser:
        with_profile(q)
        q.add_argument("--root", help="store URL (default: the profile's storage.root)")
        q.set_defaults(fn=lambda args: cmd_store(args, make_params))
        return q

    common(verbs.add_parser("ls", help="list complete outputs")).add_argument("--stage", help="only this stage")
    common(verbs.add_parser("show", help="one output and its lineage")).add_argument(
        "key", help="stage/key, a key, or a unique key prefix (6+ characters)")
    gc = common(verbs.add_parser("gc", help="remove outputs that no kept result refers to"))
    gc.add_argument("--keep", type=int, required=True, metavar="N", help="keep the N most recent results")
    gc.add_argument("--dry-run", action="store_true", help="print the plan, delete nothing")
    gc.add_argument("--include-partial", action="store_true",
                    help="also remove folders without a manifest that nothing touched within the grace period")
    gc.add_argument("--grace", type=float, metavar="SECONDS",
                    help="never remove what was written this recently (default: storage.lease_seconds)")
