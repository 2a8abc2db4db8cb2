"""Rows per second and peak memory of the data stage on preference data as users have it.

    python benchmarks/data_throughput.py                 # 1M rows, and a quarter of that to show memory's slope
    python benchmarks/data_throughput.py --rows 200000   # quicker

Generates HH-RLHF-shaped rows (whole transcripts, 0-2 earlier turns, ~0.9 kB a row) in a temporary folder, as
``.jsonl.gz`` (the way HH-RLHF ships) and as parquet, then runs the data stage on each in a fresh process, as
the pipeline's task runs it (``Anthropic/hh-rlhf`` layout, split 2,4,4, the tiny profile's actor tokenizer
measuring rl prompts against ``max_prompt_tokens`` 256, store in the temporary folder). Reports the stage's
time (job start to manifest), rows per second, and the process's peak resident memory (``ru_maxrss``:
Python, torch and transformers imports included).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the a cat dog house garden river bread water friend teacher question answer simple quickly slowly "
         "because therefore however important small large happy careful kind rude helpful please thanks tell "
         "me how why what when where should could would make find give take explain describe").split()

CHILD = r"""
import json, sys, time
from rlhf_core.config import load_config
from rlhf_core.stages import registry
from rlhf_core.stages.launch import make_job, run_job
overrides = json.loads(sys.argv[1])
cfg = load_config("tiny", overrides)
t0 = time.perf_counter()
key = registry.key(registry.DATA, cfg)
run_job(make_job(cfg, registry.DATA, key, {}))
elapsed = time.perf_counter() - t0
from rlhf_core.storage.store import Store
m = Store.from_config(cfg.storage).read_manifest(registry.DATA, key)
print(json.dumps({"seconds": elapsed, "rows": m.metrics["rows"], "sources": m.metrics["sources"]}))
"""


def _sentences(rng: random.Random, n: int, words: int) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(words + rng.randint(-words // 3, words // 3))) for _ in range(n)]


def generate(folder: Path, rows: int, seed: int = 0) -> dict[str, Path]:
    """HH-RLHF-shaped rows as train.jsonl.gz and train.parquet (a pool of sentences combined per row)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    human, assistant, answer = _sentences(rng, 4096, 18), _sentences(rng, 4096, 24), _sentences(rng, 4096, 30)
    jsonl = folder / "jsonl" / "train.jsonl.gz"
    parquet = folder / "parquet" / "train.parquet"
    jsonl.parent.mkdir(parents=True)
    parquet.parent.mkdir(parents=True)
    writer = None
    with gzip.open(jsonl, "wt", compresslevel=1) as out:
        for start in range(0, rows, 100_000):
            chosen, rejected = [], []
            for i in range(start, min(rows, start + 100_000)):
                turns = "".join(f"\n\nHuman: {rng.choice(human)}\n\nAssistant: {rng.choice(assistant)}"
                                for _ in range(rng.randint(0, 2)))
                prompt = f"{turns}\n\nHuman: {rng.choice(human)} {i}?\n\nAssistant:"
                good, bad = rng.sample(answer, 2)
                chosen.append(f"{prompt} {good}")
                rejected.append(f"{prompt} {bad}")
            # The text has no characters JSON escapes other than newlines.
            out.write("".join('{"chosen": %s, "rejected": %s}\n' % (json.dumps(c), json.dumps(r))
                              for c, r in zip(chosen, rejected)))
            table = pa.table({"chosen": chosen, "rejected": rejected})
            writer = writer or pq.ParquetWriter(parquet, table.schema)
            writer.write_table(table, row_group_size=65536)
    writer.close()
    return {"jsonl.gz": jsonl, "parquet": parquet}


def run_stage(path: Path, store: Path) -> dict:
    overrides = {
        "storage.root": str(store),
        "data.sources": [{"name": "Anthropic/hh-rlhf", "path": str(path)}],
        "data.max_prompt_tokens": 256,
        "models.actor.architecture.max_position_embeddings": 512,
        "models.reward.architecture.max_position_embeddings": 512,
    }
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(overrides)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(err[-4000:])
    result = json.loads(out.strip().splitlines()[-1])
    result["wall"] = wall
    return result


def child_usage() -> tuple[float, float]:
    """Peak RSS (MiB; ru_maxrss is in KiB on Linux) and CPU seconds (user + system) of this process's children."""
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_maxrss / 1024, u.ru_utime + u.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    sizes = sorted({max(1000, args.rows // 4), args.rows})
    results = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="rlhf-data-bench-") as tmp:
        for n in sizes:
            folder = Path(tmp) / f"rows-{n}"
            t0 = time.perf_counter()
            files = generate(folder, n)
            print(f"generated {n} rows in {time.perf_counter() - t0:.0f} s: "
                  + ", ".join(f"{k} {v.stat().st_size / 2**20:.0f} MiB" for k, v in files.items()), flush=True)
            for kind, path in files.items():
                # ru_maxrss of RUSAGE_CHILDREN is the largest child so far: measure each in its own process tree.
                r = subprocess.run([sys.executable, __file__, "--one", str(path), str(folder / f"store-{kind}")],
                                   capture_output=True, text=True)
                if r.returncode:
                    sys.exit(r.stdout[-2000:] + r.stderr[-4000:])
                one = json.loads(r.stdout.strip().splitlines()[-1])
                one.update(kind=kind, n=n, file_mib=path.stat().st_size / 2**20)
                results.append(one)
                print(f"  {kind}: {one['seconds']:.1f} s, {n / one['seconds']:,.0f} rows/s, peak {one['rss_mib']:.0f} MiB",
                      flush=True)
    print(f"\ndata stage on {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, python "
          f"{sys.version.split()[0]}, {time.strftime('%Y-%m-%d')}; load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after (other work on the machine slows the stage: CPU s does not depend on it)")
    print("| file | rows | file MiB | stage s | rows/s | process CPU s | peak RSS MiB | rows out (sft/reward/rl train) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        rows = r["rows"]
        print(f"| {r['kind']} | {r['n']:,} | {r['file_mib']:.0f} | {r['seconds']:.1f} | {r['n'] / r['seconds']:,.0f} | "
              f"{r['cpu_s']:.1f} | {r['rss_mib']:.0f} | {rows['sft/train']:,} / {rows['reward/train']:,} / "
              f"{rows['rl/train']:,} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def one(path: str, store: str) -> None:
    result = run_stage(Path(path), Path(store))
    result["rss_mib"], result["cpu_s"] = child_usage()
    result.pop("sources")
    print(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--one":
        one(sys.argv[2], sys.argv[3])
    else:
        main()
