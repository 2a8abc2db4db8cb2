"""Shared fixtures: an isolated Prefect, a moto S3 server on 127.0.0.1, tiny configs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

_TMP = Path(tempfile.mkdtemp(prefix="rlhf-tests-"))
# Isolate Prefect (home, results, no telemetry) before anything imports it.
os.environ.setdefault("PREFECT_HOME", str(_TMP / "prefect-home"))
os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(_TMP / "prefect-results")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("RLHF_CACHE_DIR", str(_TMP / "cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rlhf_core.config import PipelineConfig, load_config  # noqa: E402

PROJECT = Path(__file__).resolve().parent.parent


def tiny_config(root: str | Path, **overrides: Any) -> PipelineConfig:
    """The tiny profile with its store at ``root`` and dotted overrides (``{'rl.max_steps': 3}``)."""
    root = str(root)
    return load_config("tiny", {"storage.root": root if "://" in root else f"file://{root}", **overrides})


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 (as s3fs's own tests do) with a bucket; yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION="us-east-1")
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="rlhf-test")
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and mtime (to show that a run wrote nothing)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory):
    """The tiny profile's data, SFT and reward outputs, trained once per session (SFT and reward at the
    same time, as the pipeline runs them)."""
    import concurrent.futures

    from tests.helpers import output, prepare, worker

    root = tmp_path_factory.mktemp("tiny-store")
    cfg = tiny_config(root)
    data = prepare(cfg)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = {s: pool.submit(worker, cfg, s, {"data": data}) for s in ("sft", "reward")}
        for stage, fut in runs.items():
            proc = fut.result()
            assert proc.returncode == 0, f"{stage} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return {"cfg": cfg, "data": data, "sft": output(cfg, "sft", {"data": data}),
            "reward": output(cfg, "reward", {"data": data})}
