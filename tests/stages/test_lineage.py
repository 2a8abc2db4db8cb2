"""`rlhf store ls|show|gc` on a store built from small fake outputs (no training, no Prefect)."""

import datetime
import os
import re
import time

import pytest

from flows.cli import main
from rlhf_core.stages import lineage
from rlhf_core.storage.lease import StageLease
from rlhf_core.storage.store import MANIFEST, Store


def _out(store, stage, key, upstream=(), metrics=None, size=10, run="run-1"):
    with store.open_output(stage, key) as out:
        out.write_bytes("payload.bin", bytes(size))
        m = out.commit(stage_version=1, config={}, upstream={u.stage: u for u in upstream}, metrics=metrics or {},
                       producer={"flow_run_name": run, "flow_run_id": f"id-{run}"})
    time.sleep(0.002)  # distinct created_at
    return m


def _key(name: str) -> str:
    return (name.encode().hex() + "0" * 20)[:20]


@pytest.fixture
def built(tmp_path):
    """Three runs: run 1 went to evaluate, run 2 stopped at PPO, run 3 trained another SFT then PPO; an
    old reward model nothing uses; a PPO attempt in progress (leased) that reads an old SFT; a failed one."""
    store = Store(str(tmp_path / "store"))
    o = {}
    o["d1"] = _out(store, "data", _key("d1"), metrics={"rows": 1000})
    o["s_old"] = _out(store, "sft", _key("s_old"), [o["d1"]], {"eval_loss": 1.5})
    o["s1"] = _out(store, "sft", _key("s1"), [o["d1"]], {"eval_loss": 0.8})
    o["r1"] = _out(store, "reward", _key("r1"), [o["d1"]], {"eval_accuracy": 0.97}, size=50)
    o["r0"] = _out(store, "reward", _key("r0"), [o["d1"]], {"eval_accuracy": 0.6}, size=40)
    o["p1"] = _out(store, "rl", _key("p1"), [o["d1"], o["s1"], o["r1"]], {"gold_last": 2.0})
    o["e1"] = _out(store, "export", _key("e1"), [o["p1"]], {"models": ["ema", "final"]})
    o["v1"] = _out(store, "evaluate", _key("v1"), [o["d1"], o["s1"], o["r1"], o["e1"]],
                   {"models": {"sft": {"win_rate_vs_sft": 0.5}, "final": {"win_rate_vs_sft": 0.78}}})
    o["p2"] = _out(store, "rl", _key("p2"), [o["d1"], o["s1"], o["r1"]], {"gold_last": 1.5}, run="run-2")
    o["s3"] = _out(store, "sft", _key("s3"), [o["d1"]], {"eval_loss": 0.7}, run="run-3")
    o["p3"] = _out(store, "rl", _key("p3"), [o["d1"], o["s3"], o["r1"]], {"gold_last": 2.2}, run="run-3")
    old = time.time() - 3600
    for name, m in o.items():  # made an hour ago (in order), so that only the grace test sees young outputs
        created = datetime.datetime.fromisoformat(m.created_at) - datetime.timedelta(hours=1)
        o[name] = m.model_copy(update={"created_at": created.isoformat(timespec="milliseconds")})
        store.write_bytes_atomic(store.output_path(m.stage, m.key, MANIFEST), o[name].model_dump_json().encode())
    for name, stage in (("running", "rl"), ("failed", "rl")):
        folder = tmp_path / "store" / stage / _key(name)
        (folder / "checkpoints" / "step-000010").mkdir(parents=True)
        (folder / "checkpoints" / "step-000010" / "w.bin").write_bytes(bytes(30))
        for p in [*folder.rglob("*"), folder]:
            os.utime(p, (old, old))  # nothing written for an hour: only the lease says it is running
    lease = StageLease(store, "rl", _key("running"), ttl=600, holder={"flow_run_name": "run-4"},
                       upstream={"data": _key("d1"), "sft": _key("s_old"), "reward": _key("r1")}, log=lambda m: None)
    assert lease.try_acquire()
    return store, o, lease


def test_gc_keeps_recent_results_and_their_inputs_and_what_a_lease_holds(built):
    store, o, lease = built
    plan = lineage.plan_gc(store, keep=2, grace_seconds=60)
    ref = lineage.ref_of
    assert plan.results == [ref(o["p3"]), ref(o["p2"])]
    assert plan.keep == {ref(o[n]) for n in ("p3", "s3", "r1", "d1", "p2", "s1")}
    assert plan.protected == {ref(o["s_old"]): f"read by the leased rl/{_key('running')[:8]}"}
    # Downstream before upstream, so that no remaining output ever names a deleted one.
    assert plan.delete == [ref(o["v1"]), ref(o["e1"]), ref(o["p1"]), ref(o["r0"])]
    assert plan.kept_partial == {("rl", _key("running")): "in progress",
                                 ("rl", _key("failed")): "a failed attempt; --include-partial removes it"}
    assert plan.freed_bytes == 10 + 10 + 10 + 40

    removed = lineage.apply_gc(store, plan, log=lambda m: None)
    assert removed == plan.delete
    left = {ref(m) for m in store.list_outputs()}
    assert left == plan.keep | {ref(o["s_old"])}
    for stage, key in removed:
        assert not store.fs.exists(store.output_path(stage, key))
    assert store.fs.exists(store.output_path("rl", _key("running"), "checkpoints"))

    # Once the lease is gone, the old SFT it read is garbage too; failed attempts only with include_partial.
    lease.release()
    plan = lineage.plan_gc(store, keep=2, grace_seconds=60, include_partial=True)
    assert plan.delete == [ref(o["s_old"])]
    assert plan.delete_partial == [("rl", _key("failed")), ("rl", _key("running"))]


def test_gc_never_removes_young_outputs_and_keeping_enough_removes_nothing(built):
    store, o, _ = built
    assert lineage.plan_gc(store, keep=10, grace_seconds=0).delete == []  # negative control: all are results' inputs
    young = lineage.plan_gc(store, keep=1, grace_seconds=3 * 3600)
    assert young.delete == []
    assert set(young.protected.values()) >= {"younger than the grace period"}
    with pytest.raises(ValueError, match="keep must be >= 0"):
        lineage.plan_gc(store, keep=-1, grace_seconds=0)


def test_ls_and_show_give_sizes_metrics_runs_and_lineage(built):
    store, o, _ = built
    listing = lineage.ls(store)
    assert re.search(rf"^sft +{_key('s3')} +10 B .* run-3 +data:{_key('d1')[:8]} +eval_loss 0.700$", listing, re.M)
    assert "run-3" in listing and "eval_loss 0.700" in listing
    assert "final win_rate_vs_sft 0.780" in listing and f"sft:{_key('s1')[:8]}" in listing
    assert f"rl/{_key('running')}" in listing  # the attempt without a manifest is listed apart
    assert "reward" not in lineage.ls(store, "sft").split("without manifest")[0]

    shown = lineage.show(store, _key("p3")[:10])
    assert f"rl/{_key('p3')}" in shown and "flow run run-3 (id-run-3)" in shown and "gold_last: 2.2" in shown
    chain = shown.split("  upstream\n")[1].split("  downstream")[0]
    assert f"sft/{_key('s3')}" in chain and f"reward/{_key('r1')}" in chain
    assert chain.count(f"data/{_key('d1')}") == 3  # directly, and through SFT and reward (recursive)
    assert shown.split("  downstream\n")[1].strip() == "(none)"
    down = lineage.show(store, f"reward/{_key('r1')}").split("  downstream\n")[1]
    assert all(f"{s}/{_key(n)}" in down for s, n in (("rl", "p1"), ("rl", "p2"), ("rl", "p3"), ("evaluate", "v1")))


def test_show_refuses_unknown_short_and_ambiguous_keys(built):
    store, o, _ = built
    with pytest.raises(KeyError, match="no complete output 'ffffffff'.*rlhf store ls"):
        lineage.show(store, "ffffffff")
    with pytest.raises(KeyError, match="too short"):
        lineage.show(store, "707")
    _out(store, "sft", _key("p1")[:10] + "f" * 10, [o["d1"]])
    with pytest.raises(KeyError, match="matches 2 outputs.*give stage/key"):
        lineage.show(store, _key("p1")[:10])
    assert f"rl/{_key('p1')}" in lineage.show(store, f"rl/{_key('p1')[:10]}")


def test_store_cli(built, capsys):
    store, o, _ = built
    assert main(["store", "ls", "--root", store.url, "--stage", "rl"]) == 0
    assert _key("p2") in capsys.readouterr().out
    assert main(["store", "show", f"rl/{_key('p1')}", "--root", store.url]) == 0
    assert f"export/{_key('e1')}" in capsys.readouterr().out
    before = {lineage.ref_of(m) for m in store.list_outputs()}
    assert main(["store", "gc", "--keep", "2", "--grace", "0", "--dry-run", "--root", store.url]) == 0
    out = capsys.readouterr().out
    assert f"delete  evaluate/{_key('v1')}" in out and "dry run: nothing deleted" in out
    assert {lineage.ref_of(m) for m in store.list_outputs()} == before
    assert main(["store", "gc", "--keep", "2", "--grace", "0", "--root", store.url]) == 0
    assert "deleted 4 outputs" in capsys.readouterr().out
    assert main(["store", "show", f"evaluate/{_key('v1')}", "--root", store.url]) == 2
    assert "no complete output" in capsys.readouterr().err
    assert main(["store", "gc", "--keep", "-1", "--root", store.url]) == 2
    assert "--keep must be >= 0" in capsys.readouterr().err
