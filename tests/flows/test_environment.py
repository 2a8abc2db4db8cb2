"""The temporary Prefect API server `rlhf` starts first thing, while it imports and checks."""

import os
import urllib.request

import pytest

from flows.environment import TemporaryServer


def test_no_server_when_one_is_configured(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert TemporaryServer.start_unless_configured() is None


def test_no_server_under_an_active_prefect_configuration(prefect_harness, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert TemporaryServer.start_unless_configured() is None  # prefect_test_harness's server is used


def test_the_server_starts_answers_and_goes(monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    server = TemporaryServer(port=_free())
    try:
        assert os.environ["PREFECT_API_URL"] == server.url  # set at once: the flow will find it
        server.wait()
        with urllib.request.urlopen(f"{server.url}/health", timeout=5) as r:
            assert r.status == 200
        assert server.ready_s is not None and server.ready_s > 0
    finally:
        server.stop()
    assert server.proc.poll() is not None and "PREFECT_API_URL" not in os.environ


def test_a_server_that_cannot_start_is_reported_with_its_output(monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", "nosuchdb://nowhere")
    server = TemporaryServer(port=_free())
    with pytest.raises(RuntimeError, match="Prefect's temporary API server exited with code"):
        server.wait()
    server.stop()
    assert "PREFECT_API_URL" not in os.environ


def _free() -> int:
    from flows.environment import free_port

    return free_port()


def test_rlhf_imports_no_torch_until_a_stage_needs_it():
    """A cached run and `rlhf config` never load a model: the CLI, the flows and the tasks import no torch
    (1.9 s of CPU on 2 cores). Negative control: the module that loads models does import it."""
    import subprocess
    import sys

    from tests.conftest import PROJECT

    check = "import sys, {mods}; print('torch' in sys.modules)"
    light = subprocess.run([sys.executable, "-c", check.format(mods="flows.cli, flows.pipeline, flows.stage_flows")],
                           cwd=PROJECT, capture_output=True, text=True)
    heavy = subprocess.run([sys.executable, "-c", check.format(mods="rlhf_core.models.loading")],
                           cwd=PROJECT, capture_output=True, text=True)
    assert (light.stdout.strip(), heavy.stdout.strip()) == ("False", "True"), light.stderr + heavy.stderr
