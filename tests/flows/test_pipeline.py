"""The whole tiny pipeline: the README's first command end to end, then the cache behaviour."""

import os
import subprocess
import sys

import pytest

from flows.params import RunParams
from flows.pipeline import rlhf_pipeline
from tests.conftest import PROJECT, snapshot

pytestmark = pytest.mark.slow


def _task_states(flow_state) -> dict[str, str]:
    """Task name -> final state name of one flow run, read back through Prefect's API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """`rlhf run --profile tiny` as a user types it (with the store in a temporary folder)."""
    root = tmp_path_factory.mktemp("pipeline-store")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_LOGGING_LEVEL"] = "INFO"  # as a user sees it (the tests' own default is WARNING)
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--profile", "tiny", "--set", f"storage.root={root}"],
                          cwd=PROJECT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return root, proc.stdout + proc.stderr


def test_first_command_completes_and_reports(first_run):
    root, stdout = first_run
    assert "Headline:" in stdout and "gold_reward: sft" in stdout and "report" in stdout
    for stage in ("data", "sft", "reward", "rl", "export", "evaluate"):
        assert any((root / stage).glob("*/manifest.json")), stage
    report = next((root / "evaluate").glob("*/report.md")).read_text()
    assert "| final |" in report and "| ema |" in report  # the EMA actor is exported and evaluated
    assert any((root / "export").glob("*/ema/model.safetensors"))


def test_the_terminal_shows_each_stage_start_progress_and_end_and_no_third_party_bars(first_run):
    import re

    _, out = first_run
    for stage in ("data", "sft", "reward", "rl", "export", "evaluate"):
        assert f"{stage}: started" in out and re.search(rf"{stage}: done in \d+\.\d s", out), stage
    for stage in ("sft", "reward", "rl", "evaluate"):  # the workers: their start-up and CPU time
        assert re.search(rf"{stage}: done in [\d.]+ s \(worker: (ready to train in [\d.]+ s, )?[\d.]+ s CPU\)", out)
    assert re.search(r"sft 600/600 \[[\d:]+<00:00, +[\d.]+ step/s\] loss [\d.]+", out)
    assert re.search(r"reward 1000/1000 \[[\d:]+<00:00, +[\d.]+ step/s\] loss [\d.]+ accuracy [\d.]+", out)
    assert re.search(r"rl \d+/50 \[[\d:]+<[\d:?]+, +[\d.?]+ step/s\] reward [-\d.]+ kl [-\d.]+", out)
    # One line per update, each prefixed by its task run: sft and reward training at once stay readable.
    progress = [line for line in out.splitlines() if re.search(r"(sft|reward) \d+/\d+ \[", line)]
    assert progress and all(re.search(r"Task run 'train-(sft|reward)-\w+' - (sft|reward) \d+/", line) for line in progress)
    assert "Loading weights" not in out and "Writing model shards" not in out and "%|" not in out


def test_second_run_is_all_cache_hits_and_a_ppo_change_reruns_only_what_follows(first_run, prefect_harness):
    root, _ = first_run
    params = RunParams(profile="tiny", overrides={"storage.root": str(root)})
    before = snapshot(root)
    state = rlhf_pipeline(params, return_state=True)
    assert state.is_completed()
    states = _task_states(state)
    assert set(states) == {"prepare-data", "train-sft", "train-reward", "train-rl", "export-actors", "evaluate"}
    assert set(states.values()) == {"Cached"}, states
    assert snapshot(root) == before  # a cached run writes nothing

    changed = RunParams(profile="tiny", overrides={"storage.root": str(root), "rl.kl.coef": 0.3, "rl.max_steps": 10})
    states = _task_states(rlhf_pipeline(changed, return_state=True))
    assert {k: v for k, v in states.items() if v == "Cached"}.keys() == {"prepare-data", "train-sft", "train-reward"}
    assert {states[k] for k in ("train-rl", "export-actors", "evaluate")} == {"Completed"}


def test_sft_and_reward_ran_at_the_same_time(first_run):
    """The pipeline submits both training stages at once: their workers' lifetimes overlap."""
    import datetime
    import json

    root, _ = first_run
    span = {}
    for stage in ("sft", "reward"):
        m = json.loads(next((root / stage).glob("*/manifest.json")).read_text())
        span[stage] = (datetime.datetime.fromisoformat(m["producer"]["started_at"]),
                       datetime.datetime.fromisoformat(m["created_at"]))
    (s1, e1), (s2, e2) = span["sft"], span["reward"]
    assert s1 < e2 and s2 < e1, span


# --------------------------------------------------------------------------------- rlhf eval --model


def test_rlhf_eval_of_the_exported_actor_gives_the_evaluate_stages_numbers(first_run, prefect_harness, tmp_path):
    """The evaluation code is shared, not forked: a model the user brings (here the export's final actor, by
    its folder) gets exactly the row the evaluate stage gave it, in the same report."""
    import json

    from flows.eval_model import eval_model_flow

    root, _ = first_run
    final = next((root / "export").glob("*/final"))
    table = eval_model_flow(RunParams(profile="tiny", storage_root=str(root)), str(final), "final", str(tmp_path))
    stage = json.loads(next((root / "evaluate").glob("*/metrics.json")).read_text())
    assert table == {"sft": stage["sft"], "final": stage["final"]}
    assert json.loads((tmp_path / "metrics.json").read_text()) == table
    report = (tmp_path / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| model |"))
    assert header == next(line for line in next((root / "evaluate").glob("*/report.md")).read_text().splitlines()
                          if line.startswith("| model |"))
    assert "| final |" in report and (tmp_path / "plots" / "evaluation.png").exists()
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 128


def test_rlhf_eval_of_a_model_with_another_vocabulary(first_run, prefect_harness, tmp_path):
    """Another tokenizer (two words' ids swapped): prompted in its own tokens and scored as text; KL to SFT and
    the corpus perplexity, which need the SFT actor's tokens, are n/a."""
    import json
    import shutil

    from flows.eval_model import eval_model_flow
    from rlhf_core.config import load_config
    from rlhf_core.models.causal_lm import build_causal_lm, save_causal_lm
    from rlhf_core.models.tokenizers import load_tokenizer

    root, _ = first_run
    tok_dir = tmp_path / "tok"
    shutil.copytree(PROJECT / "data" / "tiny_tokenizer", tok_dir)
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["cat"], vocab["dog"] = vocab["dog"], vocab["cat"]
    (tok_dir / "tokenizer.json").write_text(json.dumps(spec))
    cfg = load_config("tiny", {"models.actor.tokenizer": str(tok_dir)})
    tok = load_tokenizer(cfg.models.actor)
    save_causal_lm(build_causal_lm(cfg.models.actor, tok), tok, str(tmp_path / "mine"))
    table = eval_model_flow(RunParams(profile="tiny", storage_root=str(root)), str(tmp_path / "mine"), "mine",
                            str(tmp_path / "out"))
    assert set(table["mine"]) == {"reward_score", "win_rate_vs_sft", "answer_len", "gold_reward", "gold_win_rate_vs_sft"}
    assert set(table["sft"]) == set(table["mine"]) | {"kl_to_sft", "ptx_perplexity"}
    assert "| mine |" in (tmp_path / "out" / "report.md").read_text() and "n/a" in (tmp_path / "out" / "report.md").read_text()


# ----------------------------------------------------------------------------- kill and Ctrl-C


def test_a_sigkilled_rlhf_run_leaves_no_worker_and_no_server_running(tmp_path):
    """`rlhf run` SIGKILLed while its workers train: they and Prefect's temporary server stop with it (its
    reaper), and the leases it held name it, so that the next run can take them over at once."""
    import json
    import signal
    import time

    from rlhf_core.storage.process import process_id

    root = tmp_path / "store"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--profile", "tiny", "--set",
                             f"storage.root={root}"], cwd=PROJECT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)

    def children() -> dict[int, str]:
        out = {}
        for pid in os.listdir("/proc"):
            try:
                stat = open(f"/proc/{pid}/stat").read()
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == proc.pid:
                out[int(pid)] = cmd
        return out

    try:
        deadline = time.monotonic() + 600
        while True:  # the temporary server and both training workers are up
            kids = children()
            workers = [p for p, c in kids.items() if "rlhf_core.stages.launch" in c]
            server = [p for p, c in kids.items() if "uvicorn" in c]
            recorded = [json.loads(p.read_text()).get("workers") for p in (root / "_leases").glob("*.json")]
            if len(workers) == 2 and server and sum(bool(w) for w in recorded) == 2:
                break
            assert proc.poll() is None and time.monotonic() < deadline, kids
            time.sleep(0.2)
        ids = [process_id(p) for p in (*workers, *server)]
    finally:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 120
    while not all(i is None or i.gone() for i in ids):
        assert time.monotonic() < deadline, "a worker or the temporary server outlived the killed rlhf run"
        time.sleep(0.2)
    leases = [json.loads(p.read_text()) for p in (root / "_leases").glob("*.json")]
    assert {rec["stage"] for rec in leases} == {"sft", "reward"}
    assert all(rec["process"]["pid"] == proc.pid and len(rec["workers"]) == 1 for rec in leases)


def test_ctrl_c_stops_a_run_at_once_with_its_workers(tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) ends `rlhf run` at once, with one line, and its
    workers (in their own sessions, out of the terminal's reach) stop with it. Before, the run went on
    retrying against the temporary server the same Ctrl-C had stopped (over 90 s, tracebacks)."""
    import json
    import signal
    import time

    from rlhf_core.storage.process import ProcessId

    root = tmp_path / "store"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--profile", "tiny", "--set",
                             f"storage.root={root}", "--set", "sft.max_steps=100000", "--set", "reward.max_steps=100000"],
                            cwd=PROJECT, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "err", "w"),
                            start_new_session=True)  # its own group, as a shell gives a foreground job
    try:
        deadline = time.monotonic() + 600
        while len(workers := [p for p in (root / "_leases").glob("*.json")]) < 2 or not all(
                json.loads(p.read_text()).get("workers") for p in workers):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        ids = [json.loads(p.read_text())["workers"][0] for p in workers]
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=120)  # not minutes of retries
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 130 and "rlhf: interrupted. Finished stages are kept" in (tmp_path / "err").read_text()
    deadline = time.monotonic() + 120
    while not all(ProcessId.model_validate(i).group_gone() for i in ids):
        assert time.monotonic() < deadline, "a worker outlived the interrupted run"
        time.sleep(0.2)
