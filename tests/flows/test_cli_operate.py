"""`rlhf run` / `rlhf serve` refuse bad input before any work; deployments, their schedules and their form."""

import pytest

import flows.pipeline
from flows.cli import main
from flows.params import RunParams
from flows.serve import build_deployments, schedules
from rlhf_core.config import ConfigError, load_config


@pytest.fixture
def no_flow(monkeypatch):
    """Fail the test if the pipeline flow is ever called: refusals must come before it."""
    def called(*a, **k):
        raise AssertionError("the pipeline started")

    monkeypatch.setattr(flows.pipeline, "rlhf_pipeline", called)


@pytest.mark.parametrize("args, message", [
    (["--profile", "nope"], "unknown profile 'nope': known profiles are gpu_smoke, multi_node, single_gpu, single_node, tiny"),
    (["--set", "rl.kl.coef"], "override 'rl.kl.coef' must look like key.path=value"),
    (["--set", "rl.kl.coef=[1"], "override 'rl.kl.coef=[1': value is not valid YAML"),
    (["--set", "rl.kl.coef=lots"], "rl.kl.coef: Input should be a valid number"),
    (["--set", "reward.existing=file:///nowhere/reward/" + "0" * 20],
     "there is no manifest.json at file:///nowhere/reward/" + "0" * 20 + "/manifest.json"),
    (["--set", "reward.existing=" + "1" * 20], "holds no complete reward output"),
    (["--set", "reward.existing=my-best-rm"], "reward.existing 'my-best-rm' is neither a reward key"),
])
def test_run_refuses_bad_input_before_any_work(no_flow, tmp_path, capsys, args, message):
    root = tmp_path / "store"
    assert main(["run", *args, "--set", f"storage.root={root}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlhf: ") and message in err
    assert not root.exists()


@pytest.mark.parametrize("args, message", [
    (["--profile", "nope"], "unknown profile 'nope'"),
    (["--cron", "every day"], "--cron: Invalid cron string: \"every day\""),
    (["--cron", "a b c d e"], "--cron: Invalid cron string"),
    (["--set", "schedule.cron=99 3 * * *"], "the profile's schedule: Invalid cron string"),
    (["--interval", "5"], "--interval 5.0: runs of a training pipeline need at least 60 seconds"),
    (["--set", "schedule.cron=0 3 * * *", "--set", "schedule.interval_seconds=3600"], "not both"),
])
def test_serve_refuses_bad_input_before_serving(monkeypatch, capsys, args, message):
    import prefect

    monkeypatch.setattr(prefect, "serve", lambda *a, **k: pytest.fail("served"))
    assert main(["serve", *args]) == 2
    assert message in capsys.readouterr().err


def test_deployments_of_every_flow_with_a_form_and_the_schedule_on_the_pipeline():
    params = RunParams(profile="tiny", storage_root="s3://bucket/rlhf", rl_kl_coef=0.05)
    cfg = params.config()
    deployments = build_deployments(params, cfg, cron="0 3 * * *")
    assert {d.flow_name for d in deployments} == {"rlhf-pipeline", "rlhf-data", "rlhf-sft", "rlhf-reward",
                                                   "rlhf-rl", "rlhf-export", "rlhf-evaluate"}
    assert {d.name for d in deployments} == {"tiny"}
    by_flow = {d.flow_name: d for d in deployments}
    assert by_flow["rlhf-rl"].entrypoint == "flows.stage_flows.rl_flow"  # a module path: any working directory
    (schedule,) = by_flow["rlhf-pipeline"].schedules
    assert schedule.schedule.cron == "0 3 * * *" and not by_flow["rlhf-sft"].schedules
    assert by_flow["rlhf-sft"].parameters == {"params": {"profile": "tiny", "storage_root": "s3://bucket/rlhf",
                                                         "rl_kl_coef": 0.05}}
    form = by_flow["rlhf-pipeline"]._parameter_openapi_schema.model_dump()["definitions"]["RunParams"]["properties"]
    assert {"profile", "storage_root", "reward_existing", "rl_max_steps", "rl_kl_coef", "actor_name_or_path",
            "overrides"} <= form.keys()
    assert form["rl_max_steps"]["anyOf"][0] == {"minimum": 1, "type": "integer"}  # typed and bounded in the UI


def test_schedule_from_the_profile_and_the_command_line():
    from_profile = load_config("tiny", {"schedule.interval_seconds": 3600})
    (s,) = schedules(from_profile)
    assert s.interval.total_seconds() == 3600 and s.timezone == "UTC"
    (s,) = schedules(from_profile, cron="30 2 * * 1")  # the command line wins
    assert s.cron == "30 2 * * 1" and s.interval is None
    assert schedules(load_config("tiny")) == []
    with pytest.raises(ConfigError, match="not both"):
        schedules(from_profile, cron="0 3 * * *", interval=3600)
    with pytest.raises(ConfigError, match="schedule.cron 'hourly'|cron 'hourly' must have 5 fields"):
        load_config("tiny", {"schedule.cron": "hourly"})


def test_typed_form_fields_map_onto_dotted_overrides():
    p = RunParams(actor_name_or_path="facebook/opt-125m", rl_max_steps=3, overrides={"rl.kl.coef": 0.05})
    assert p.all_overrides() == {"rl.kl.coef": 0.05, "rl.max_steps": 3, "models.actor.name_or_path": "facebook/opt-125m",
                                 "models.actor.architecture": None, "models.actor.tokenizer": None}
    cfg = p.config()
    assert cfg.models.actor.name_or_path == "facebook/opt-125m" and cfg.models.actor.tokenizer_path == "facebook/opt-125m"
    assert RunParams(rl_kl_coef=0.05, overrides={"rl.kl.coef": 0.05}).all_overrides() == {"rl.kl.coef": 0.05}
    with pytest.raises(ConfigError, match="rl_kl_coef=0.1 and overrides\\['rl.kl.coef'\\]=0.2 disagree"):
        RunParams(rl_kl_coef=0.1, overrides={"rl.kl.coef": 0.2}).config()
    with pytest.raises(ValueError):
        RunParams(rl_max_steps=0)  # the form's bounds hold outside the UI too


def test_stage_flows_run_their_stage_and_what_it_is_made_from(tmp_path):
    from rlhf_core.stages import registry as stages
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path)
    assert stages.needed_for("reward", cfg) == {"data", "reward"}
    assert stages.needed_for("rl", cfg) == {"data", "sft", "reward", "rl"}
    assert stages.needed_for("evaluate", cfg) == set(stages.ORDER)
    with pytest.raises(ValueError, match="unknown stage 'ppo'; stages are data, sft"):
        stages.needed_for("ppo", cfg)
    # DPO learns from the preference pairs: step 3 reads no reward model; evaluation still scores with one
    dpo = tiny_config(tmp_path, **{"rl.algorithm": "dpo"})
    assert stages.needed_for("rl", dpo) == {"data", "sft", "rl"}
    assert stages.needed_for("evaluate", dpo) == set(stages.ORDER)
    rules = tiny_config(tmp_path, **{"rl.algorithm": "dpo", "eval.reward_model": False})
    assert stages.needed_for("evaluate", rules) == set(stages.ORDER) - {"reward"}
    # a rule-based reward alone: GRPO needs no reward model, PPO still starts its critic from one
    grpo = tiny_config(tmp_path, **{"rl.algorithm": "grpo", "rl.n_samples_per_prompt": 4, "reward.use_model": False,
                                    "reward.function": "rlhf_core.data.tiny_task:gold_reward"})
    assert stages.needed_for("rl", grpo) == {"data", "sft", "rl"}
    ppo = tiny_config(tmp_path, **{"reward.use_model": False, "reward.function": "rlhf_core.data.tiny_task:gold_reward"})
    assert stages.needed_for("rl", ppo) == {"data", "sft", "reward", "rl"}


def test_rlhf_config_shows_the_algorithm_keys(capsys):
    import json

    assert main(["config", "--profile", "tiny", "--set", "rl.algorithm=grpo", "--set", "rl.n_samples_per_prompt=4",
                 "--set", "rl.kl.use_kl_loss=true"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["rl"]["algorithm"], cfg["rl"]["n_samples_per_prompt"], cfg["rl"]["kl"]["use_kl_loss"]) == ("grpo", 4, True)
    assert {"beta", "loss_type", "label_smoothing"} <= set(cfg["rl"]["dpo"])
    assert {"function", "use_model", "function_weight"} <= set(cfg["reward"])
    assert main(["config", "--profile", "tiny", "--set", "rl.algorithm=grpo"]) == 2  # refused: n_samples_per_prompt 1
    assert "rl.n_samples_per_prompt is 1" in capsys.readouterr().err


def test_rlhf_profiles_lists_each_profile_with_its_purpose(monkeypatch, tmp_path, capsys):
    import rlhf_core.config.profiles as profiles

    (tmp_path / "mine.yaml").write_text("# mine: my own runs on the lab box.\n# Tried on: ...\nname: mine\n")
    (tmp_path / "bare.yaml").write_text("name: bare\n")
    (tmp_path / "other.yaml").write_text("# a header that does not start with the name\nname: other\n")
    monkeypatch.setattr(profiles, "PROFILES_DIR", tmp_path)
    assert main(["profiles"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == ["bare   ", "mine   my own runs on the lab box.",
                         "other  a header that does not start with the name"]


def test_the_bundled_profiles_each_say_what_they_are_for(capsys):
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    assert "tiny         the whole pipeline on a laptop CPU, offline, in minutes." in out
    assert "single_gpu   DeepSpeed-Chat's \"single GPU\" deployment" in out


@pytest.mark.parametrize("args, message", [
    (["--model", "/nowhere/model"], "--model /nowhere/model does not exist"),
    (["--model", "./not-here"], "--model: './not-here' does not exist: relative paths are resolved against"),
    (["--model", "facebook/opt-125m", "--name", "sft"], "--name 'sft' is the SFT actor's row"),
])
def test_rlhf_eval_refuses_bad_input_before_any_work(monkeypatch, tmp_path, capsys, args, message):
    import flows.eval_model

    monkeypatch.setattr(flows.eval_model, "eval_model_flow", lambda *a, **k: pytest.fail("the evaluation started"))
    monkeypatch.chdir(tmp_path)
    assert main(["eval", *args, "--set", f"storage.root={tmp_path / 'store'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlhf: ") and message in err


# ------------------------------------------------------------------------------ operational failures


@pytest.mark.parametrize("error, line", [
    ("store", "rlhf: the store s3://b/rlhf cannot be reached (EndpointConnectionError: Could not connect)\n"),
    ("worker", "rlhf: sft worker exited with code -9; last output: (its output is above); after a fix, run the same "
               "command again: finished stages are kept and this one resumes from its latest complete checkpoint\n"),
])
def test_a_run_that_fails_for_an_operational_reason_ends_with_one_line(monkeypatch, capsys, error, line):
    import flows.cli
    from rlhf_core.storage.store import StoreUnavailable
    from tasks.runner import StageFailed

    def fail(args):
        if error == "store":
            raise StoreUnavailable("the store s3://b/rlhf cannot be reached (EndpointConnectionError: Could not connect)")
        raise StageFailed("sft worker exited with code -9; last output:\nTraceback (most recent call last):\n  ...")

    monkeypatch.setattr(flows.cli, "cmd_run", fail)
    assert main(["run"]) == 1
    assert capsys.readouterr().err == line


def test_negative_control_a_bug_keeps_its_traceback(monkeypatch):
    import flows.cli

    monkeypatch.setattr(flows.cli, "cmd_run", lambda args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["run"])


def test_the_console_leaves_out_tracebacks_of_operational_failures_only():
    import logging
    import sys

    from flows.environment import OneLineFailures
    from rlhf_core.storage.store import StoreUnavailable

    fmt = OneLineFailures(logging.Formatter("%(message)s"), (StoreUnavailable,))
    for exc, traceback_shown in ((StoreUnavailable("the store is down"), False), (ValueError("a bug"), True)):
        try:
            raise exc
        except Exception:
            record = logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, "failed: %r", (exc,),
                                       sys.exc_info())
        out = fmt.format(record)
        assert out.startswith("failed: ") and ("Traceback" in out) == traceback_shown
        assert record.exc_info is not None  # the other handlers (Prefect's API, so the UI) still get it
