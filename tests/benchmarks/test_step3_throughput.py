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


def test_report_of_a_run_cut_short(tmp_path):
    """--report prints the tables from the device measurement and the rows a cut-short run left."""
    (tmp_path / "step3_device.json").write_text(json.dumps({"device": "x", "matmul_peak_tflops": 800, "copy_tb_s": 4.0}))
    rows = [{"mode": "baseline", "batch": 256, "critic": True, "generate": 5.0, "score": 1.0, "train": 4.0, "e2e": 10.0,
             "peak_gib": 40.0}, {"mode": "tuned", "batch": 256, "error": "OOM"}]
    (tmp_path / "step3_rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = subprocess.run([sys.executable, "benchmarks/step3_throughput.py", "--report", str(tmp_path), "--out",
                           str(tmp_path)], cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| baseline | 256 | 13107 |" in proc.stdout and "| 25.6 |" in proc.stdout  # 256*256/5 tok/s, 256/10 samples/s
    assert "| tuned | 256 | 'OOM' |" in proc.stdout
    saved = json.loads((tmp_path / "step3_throughput.json").read_text())["rows"]
    assert saved[0]["samples_s"] == 25.6
