"""Wall and CPU time of the tiny profile end to end, and of a fully cached re-run, as a user runs it.

    python benchmarks/tiny_e2e.py [--runs-cached 2] [--json results/tiny_e2e.json] [--api-url URL]
        # prints tables; targets: < 90 s and < 10 s wall on 2 idle CPU cores

Each run is `rlhf run --profile tiny` in a fresh process (Prefect's temporary API server included) on a
fresh store in a temporary folder, from a working directory outside the checkout. The machine may be shared:
beside the wall time it prints the CPU seconds the run used (user + system of `rlhf`, its workers and the
server: what an idle machine would have to spend; on 2 idle cores the wall time is at least half of it)
and the load average before and after. Per-stage lines come from the run's own status lines ("sft: done in
... (worker: ready to train in ..., ... CPU)").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DONE = re.compile(r"(\w+): done in ([\d.]+) s(?: \(worker: (?:ready to train in ([\d.]+) s, )?([\d.]+) s CPU\))?")
# A stage found complete: Prefect's cache (its task does not run) or the store's (the task says so).
CACHED = re.compile(r"Task run '([a-z-]+)-\w+' - Finished in state Cached")
SERVER = re.compile(r"temporary Prefect API server on \S+ \(up in ([\d.]+) s")


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(store: str, cwd: str, api_url: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PYTHONPATH=str(ROOT), PREFECT_LOGGING_LEVEL="INFO", **({"PREFECT_API_URL": api_url} if api_url else {}))
    load = os.getloadavg()
    cpu0, t0 = children_cpu(), time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--profile", "tiny", "--set",
                           f"storage.root={store}"], cwd=cwd, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, children_cpu() - cpu0
    if proc.returncode:
        sys.exit(proc.stdout[-3000:] + proc.stderr[-3000:])
    out = proc.stdout + proc.stderr
    stages = {m.group(1): {"wall_s": float(m.group(2)),
                           "ready_s": float(m.group(3)) if m.group(3) else None,
                           "worker_cpu_s": float(m.group(4)) if m.group(4) else None} for m in DONE.finditer(out)}
    server = SERVER.search(out)
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "load_before": [round(x, 2) for x in load],
            "load_after": [round(x, 2) for x in os.getloadavg()], "stages": stages,
            "cached": sorted(set(CACHED.findall(out))), "server_up_s": float(server.group(1)) if server else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs-cached", type=int, default=2, help="cached re-runs after the fresh one")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--api-url", help="run against this Prefect server (PREFECT_API_URL) instead of a temporary one")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = run(os.path.join(tmp, "store"), tmp, args.api_url)
        cached = [run(os.path.join(tmp, "store"), tmp, args.api_url) for _ in range(args.runs_cached)]
    print(f"\ntiny profile on {os.cpu_count()} CPU cores (python {sys.version.split()[0]}, {platform.node()})")
    print("| run | wall s | CPU s | server up s | load 1/5/15 min before | target |")
    print("|---|---|---|---|---|---|")
    rows = [("end to end, fresh store", fresh, "< 90")] + [(f"fully cached re-run {i + 1}", c, "< 10")
                                                            for i, c in enumerate(cached)]
    for name, r, target in rows:
        print(f"| {name} | {r['wall_s']} | {r['cpu_s']} | {r['server_up_s']} | "
              f"{'/'.join(map(str, r['load_before']))} | {target} |")
    workers = sum(s["worker_cpu_s"] or 0 for s in fresh["stages"].values())
    print(f"\nFresh run: {workers:.1f} CPU s in stage workers, {fresh['cpu_s'] - workers:.1f} in `rlhf` itself and the "
          "temporary server (imports, data and export stages, Prefect).")
    print("\n| stage (fresh run) | wall s | worker ready to train s | worker CPU s |")
    print("|---|---|---|---|")
    for stage, s in fresh["stages"].items():
        print(f"| {stage} | {s['wall_s']} | {s['ready_s'] if s['ready_s'] is not None else '-'} | "
              f"{s['worker_cpu_s'] if s['worker_cpu_s'] is not None else '(in rlhf)'} |")
    for c in cached:
        assert len(c["cached"]) == 6, c["cached"]  # every stage a cache hit
    if args.json:
        Path(args.json).write_text(json.dumps({"fresh": fresh, "cached": cached, "cpus": os.cpu_count(),
                                               "python": sys.version.split()[0]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
