"""Training curves: where live metrics go, wandb as an option, markers where points are few."""

import json
import sys
import types

import pytest

from rlhf_core.config import LoggingConfig
from rlhf_core.storage.store import Store
from rlhf_core.trainers.metrics import LIVE_DIR, MetricsLog, curves_figure, live_dir, open_wandb


def test_two_evaluations_are_drawn_as_two_marked_points_and_long_curves_as_lines():
    history = [{"step": 0, "eval/loss": 4.0}, *({"step": s, "loss": 4.0 - s / 100} for s in range(1, 201)),
               {"step": 200, "eval/loss": 1.0}]
    fig = curves_figure(history, "sft")
    lines = {ax.get_title(): ax.lines[0] for ax in fig.axes if ax.lines}
    few, many = lines["eval/loss (2 points)"], lines["loss"]
    assert few.get_marker() == "o" and few.get_linestyle() == "--"
    assert many.get_marker() in (None, "None", "") and many.get_linestyle() == "-"  # negative control: 200 points


def test_live_metrics_go_into_the_stage_output_on_a_local_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = Store(str(tmp_path / "store"))
    live = live_dir(store, "sft", "k" * 20)
    assert live == str(tmp_path / "store" / "sft" / ("k" * 20) / LIVE_DIR)
    log = MetricsLog("sft", True, live=live)
    log.log(1, {"loss": 2.0})
    assert json.loads(open(f"{live}/metrics.jsonl").read()) == {"step": 1, "loss": 2.0}
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "store" / "sft" / ("k" * 20) / LIVE_DIR).iterdir())
    log.export(str(tmp_path / "out" / "logs"), "sft")
    with store.open_output("sft", "k" * 20) as out:  # the commit clears the live folder
        out.write_bytes("x", b"1")
        out.commit(stage_version=1, config={})
    assert not (tmp_path / "store" / "sft" / ("k" * 20) / LIVE_DIR).exists()
    assert not (tmp_path / "runs").exists()  # nothing in the working directory


def test_live_metrics_of_a_remote_store_go_to_the_cache_or_rlhf_runs_dir(monkeypatch, tmp_path):
    store = Store("memory://bucket/rlhf")
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("RLHF_RUNS_DIR", raising=False)
    assert live_dir(store, "rl", "a" * 20) == str(tmp_path / "cache" / "runs" / f"rl-{'a' * 20}")
    monkeypatch.setenv("RLHF_RUNS_DIR", str(tmp_path / "mine"))
    assert live_dir(store, "rl", "a" * 20) == str(tmp_path / "mine" / f"rl-{'a' * 20}")


class FakeWandb(types.ModuleType):
    """Records what rlhf-flow asks of wandb (the real package is an optional extra)."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, row, step):
        self.logged.append((step, row))

    def finish(self):
        self.finished += 1


@pytest.fixture
def fake_wandb(monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("RLHF_WANDB", raising=False)
    return fake


def test_wandb_gets_the_settings_and_every_row_and_a_resumed_history(fake_wandb, monkeypatch):
    from tests.conftest import tiny_config
    from rlhf_core.stages import registry

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-log-me")
    cfg = tiny_config("s3://bucket/rlhf", **{"logging.wandb": True, "storage.endpoint_url": "http://10.0.0.1:9000"})
    view = registry.stage("sft").settings_of(cfg).model_dump(mode="json")
    run = open_wandb(cfg.logging, "sft", "0123456789abcdef0123", view, group="pipeline: tiny")
    assert run is fake_wandb
    (init,) = fake_wandb.inits
    assert init["project"] == "rlhf-flow" and init["name"] == "sft-01234567" and init["group"] == "pipeline: tiny"
    blob = json.dumps(init)
    assert "do-not-log-me" not in blob and "10.0.0.1" not in blob and "storage" not in init["config"]
    log = MetricsLog("sft", True, history=[{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}], wandb_run=run)
    log.log(3, {"loss": 2.0})
    log.close()
    assert fake_wandb.logged == [(1, {"loss": 3.0}), (2, {"loss": 2.5}), (3, {"loss": 2.0})]
    assert fake_wandb.finished == 1


def test_wandb_is_off_unless_asked_and_never_required(fake_wandb, monkeypatch):
    said = []
    assert open_wandb(LoggingConfig(), "sft", "k" * 20, {}, log=said.append) is None  # off by default
    monkeypatch.setenv("RLHF_WANDB", "0")
    assert open_wandb(LoggingConfig(wandb=True), "sft", "k" * 20, {}) is None  # the environment wins
    monkeypatch.setenv("RLHF_WANDB", "1")
    assert open_wandb(LoggingConfig(), "sft", "k" * 20, {}) is fake_wandb
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: training goes on without it
    assert open_wandb(LoggingConfig(), "sft", "k" * 20, {}, log=said.append) is None
    assert said == ["logging.wandb is on but wandb is not installed (pip install rlhf-flow[wandb]); logging to the "
                    "store only"]


# ------------------------------------------------------------------------ progress in the rlhf terminal


def test_progress_lines_show_step_total_eta_and_metrics_at_most_every_few_seconds():
    from rlhf_core.trainers.metrics import ProgressLines

    out = []
    p = ProgressLines("sft", out.append, every=5)
    for t, step in ((0, 0), (2, 10), (4, 20), (20, 120), (21, 126)):
        p.feed({"stage": "sft", "step": step, "total": 600, "loss": 1.2345678}, now=t)
    p.feed({"stage": "sft", "step": 600, "total": 600, "loss": 0.5}, now=100)  # the last one always
    assert out == ["sft 0/600 [00:00<?, ? step/s] loss 1.235",
                   "sft 120/600 [00:20<01:20,  6.00 step/s] loss 1.235",
                   "sft 600/600 [01:40<00:00,  6.00 step/s] loss 0.5"]


def test_progress_of_a_resumed_stage_counts_its_rate_from_where_it_resumed():
    from rlhf_core.trainers.metrics import ProgressLines

    out = []
    p = ProgressLines("rl", out.append, every=0)
    p.feed({"stage": "rl", "step": 20, "total": 50}, now=0)
    p.feed({"stage": "rl", "step": 30, "total": 50, "reward": 3.25, "kl": 0.125}, now=10)
    assert out[-1] == "rl 30/50 [00:10<00:20,  1.00 step/s] reward 3.25 kl 0.125"  # not 30 steps in 10 s


def test_the_worker_side_emits_what_the_lines_read(monkeypatch, capsys):
    import json as _json

    from rlhf_core.trainers.metrics import PROGRESS_PREFIX, Progress

    monkeypatch.setenv("RLHF_PROGRESS", "lines")
    p = Progress("reward", 3)
    for _ in range(3):
        p.update(1, loss=0.5, accuracy=0.75)
    payloads = [_json.loads(line[len(PROGRESS_PREFIX):]) for line in capsys.readouterr().out.splitlines()]
    assert payloads[0] == {"stage": "reward", "step": 0, "total": 3}
    assert payloads[-1] == {"stage": "reward", "step": 3, "total": 3, "loss": 0.5, "accuracy": 0.75}
