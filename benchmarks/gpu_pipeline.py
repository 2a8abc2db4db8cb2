"""The whole pipeline on one GPU, as a user runs it: `rlhf run --profile gpu_smoke` three times.

    python benchmarks/gpu_pipeline.py [--profile gpu_smoke] [--kill-at 7] [--out DIR] [--set KEY=VALUE ...]

1. a fresh store, uninterrupted (the reference), and at the same time
2. a fresh store where the step-3 worker SIGKILLs itself right after step ``--kill-at``
   (``RLHF_FAULT_KILL_AT_STEP``): the task's retry must resume from the last checkpoint and end with files
   identical to the reference's, stage by stage;
3. the second store again: every task must end Cached and the store must not change.

Prints per-stage wall times (a worker's start to its manifest), peak GPU memory per stage, whether step 3
took the hybrid engine's fast path, and the comparison, as a table; writes results.json to ``--out``.
Runs with RLHF_DETERMINISTIC=1 (deterministic CUDA kernels) so that equal keys can hold equal bytes.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["data", "sft", "reward", "rl", "export", "evaluate"]


def rlhf_run(profile: str, store: Path, env: dict[str, str], log: Path, sets: list[str]) -> tuple[float, str]:
    # Each store its own Prefect database: two temporary servers on one PREFECT_HOME share the rlhf-gpu
    # concurrency limit, and the two runs would queue for each other's GPU slot.
    env = {**env, "PREFECT_HOME": str(store.parent / f"prefect-{store.name}")}
    t0 = time.perf_counter()
    extra = [a for s in sets for a in ("--set", s)]
    with open(log, "w") as f:  # streamed: a run cut short by a time limit still leaves its log
        proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--profile", profile, "--set",
                               f"storage.root={store}", *extra], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env=env)
    text = log.read_text()
    if proc.returncode:
        sys.exit(f"rlhf run failed ({log}):\n" + text[-6000:])
    return time.perf_counter() - t0, text


def manifests(store: Path) -> dict[str, dict]:
    return {m["stage"]: m for m in (json.loads(p.read_text()) for p in store.glob("*/*/manifest.json"))}


def span(m: dict) -> float | None:
    start = m["producer"].get("started_at")
    if not start:
        return None
    return (datetime.datetime.fromisoformat(m["created_at"]) - datetime.datetime.fromisoformat(start)).total_seconds()


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file() and "_leases" not in p.parts}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="gpu_smoke")
    ap.add_argument("--kill-at", type=int, default=7, help="step-3 step after which the worker is SIGKILLed")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override (e.g. to try it on CPU)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-pipeline-"))
    env = {**os.environ, "RLHF_DETERMINISTIC": "1", "RLHF_CACHE_DIR": str(work / "cache")}

    marker = work / "killed-once"
    kill_env = {**env, "RLHF_FAULT_KILL_AT_STEP": f"rl:{args.kill_at}:{marker}"}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # the two stores at once: the GPU holds both
        ref_run = pool.submit(rlhf_run, args.profile, work / "ref", env, out / "run_reference.log", args.set)
        kill_run = pool.submit(rlhf_run, args.profile, work / "killed", kill_env, out / "run_killed.log", args.set)
        (ref_s, _), (kill_s, _) = ref_run.result(), kill_run.result()
    before = snapshot(work / "killed")
    cached_s, cached_log = rlhf_run(args.profile, work / "killed", env, out / "run_cached.log", args.set)
    after = snapshot(work / "killed")

    ref, got = manifests(work / "ref"), manifests(work / "killed")
    rows = []
    for stage in STAGES:
        r, g = ref[stage], got[stage]
        files_r = {f["path"]: f["sha256"] for f in r["files"]}
        files_g = {f["path"]: f["sha256"] for f in g["files"]}
        differ = sorted(p for p in files_r.keys() | files_g.keys() if files_r.get(p) != files_g.get(p))
        rows.append({"stage": stage, "fresh_s": span(r), "killed_run_s": span(g), "same_key": r["key"] == g["key"],
                     "identical_files": not differ, "differing": differ[:5],
                     "resumed_from": g["metrics"].get("resumed_from"),
                     "peak_gpu_gib": r["metrics"].get("peak_device_gib")})
    cached_states = re.findall(r"Task run .* Finished in state (\w+)\(", cached_log)
    result = {
        "device": _device(), "date": datetime.date.today().isoformat(), "profile": args.profile,
        "wall_s": {"fresh": round(ref_s, 1), "killed_and_retried": round(kill_s, 1), "cached": round(cached_s, 1)},
        "killed": marker.exists(), "rl_generation_path": ref["rl"]["metrics"].get("generation_path"),
        "cached_task_states": cached_states, "cached_run_wrote_nothing": before == after, "stages": rows,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"\n{args.profile} on {result['device']}: fresh {ref_s:.0f} s, killed+retried {kill_s:.0f} s, "
          f"cached {cached_s:.0f} s; step 3 generation path: {result['rl_generation_path']}; worker killed: "
          f"{result['killed']}; cached run wrote nothing: {result['cached_run_wrote_nothing']}; task states on the "
          f"re-run: {sorted(set(cached_states))}")
    print("| stage | s (fresh) | s (killed run) | same key | identical files | resumed from | peak GPU GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        fmt = lambda v: f"{v:.1f}" if isinstance(v, float) else ("-" if v is None else str(v))  # noqa: E731
        print(f"| {r['stage']} | {fmt(r['fresh_s'])} | {fmt(r['killed_run_s'])} | {r['same_key']} | "
              f"{r['identical_files']}{'' if r['identical_files'] else ' ' + str(r['differing'])} | "
              f"{r['resumed_from'] or '-'} | {fmt(r['peak_gpu_gib'])} |")


def _device() -> str:
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "unknown"


if __name__ == "__main__":
    main()
