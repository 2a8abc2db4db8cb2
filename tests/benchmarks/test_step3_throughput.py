"""benchmarks/step3_throughput.py's one-(mode, batch) path with tiny models on the CPU: the lead runs it on a
GPU, this keeps it working. GRPO builds no critic, PPO one (RLOO differs from GRPO only by its config)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import PROJECT


pytestmark = pytest.mark.slow


# tuned: ZeRO-1 without the contiguous-gradient buffer, kept decoder buffers, 32-position KV buckets
@pytest.mark.parametrize("mode,critic", [("fast", True), ("grpo", False), ("tuned", True)])
def test_run_one_on_cpu(mode, critic):
    one = {"mode": mode, "batch": 8, "steps": 1, "micro": 4, "device": "cpu", "tiny": True}
    proc = subprocess.run([sys.executable, "benchmarks/step3_throughput.py", "--one", json.dumps(one)], cwd=PROJECT,
                          capture_output=True, text=True, timeout=600)
    found = [line for line in proc.stdout.splitlines() if line.startswith("@@result ")]
    assert proc.returncode == 0 and found, proc.stdout[-2000:] + proc.stderr[-3000:]
    row = json.loads(found[-1][len("@@result "):])
    assert row["critic"] is critic and row["batch"] == 8 and row["e2e"] > 0 and row["train"] > 0
    assert row["samples_per_prompt"] == (4 if mode == "grpo" else 1)
