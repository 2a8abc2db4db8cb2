"""Wall time of the tiny profile end to end, and of a fully cached re-run, as a user runs it.

    python benchmarks/tiny_e2e.py            # prints a table; targets: < 300 s and < 20 s on 2 CPU cores

Each run is `rlhf run --profile tiny` in a fresh process (Prefect's temporary API server included) on a
fresh store in a temporary folder; per-stage times come from the stages' manifests (the interval between
a worker starting and its manifest being written).
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(store: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--profile", "tiny", "--set",
                           f"storage.root={store}"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stdout[-3000:] + proc.stderr[-3000:])
    return time.perf_counter() - t0


def stage_spans(store: Path) -> dict[str, float]:
    spans = {}
    for manifest in sorted(store.glob("*/*/manifest.json")):
        m = json.loads(manifest.read_text())
        start = m["producer"].get("started_at")
        if start:
            end = datetime.datetime.fromisoformat(m["created_at"])
            spans[m["stage"]] = (end - datetime.datetime.fromisoformat(start)).total_seconds()
    return spans


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        first = run(tmp)
        cached = run(tmp)
        spans = stage_spans(Path(tmp))
    print(f"\ntiny profile on {os.cpu_count()} CPU cores (python {sys.version.split()[0]})")
    print("| run | wall s | target |")
    print("|---|---|---|")
    print(f"| end to end, fresh store | {first:.1f} | < 300 |")
    print(f"| fully cached re-run | {cached:.1f} | < 20 |")
    print("\n| stage worker | s (start to manifest) |")
    print("|---|---|")
    for stage, s in spans.items():
        print(f"| {stage} | {s:.1f} |")


if __name__ == "__main__":
    main()
