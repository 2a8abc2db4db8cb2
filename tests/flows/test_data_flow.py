"""The data stage through Prefect: cache hits, invalidation, and the same content on file:// and s3://."""

from prefect import flow

from flows.stage_flows import data_flow
from flows.params import RunParams
from rlhf_core.storage.store import Store
from tasks.prepare_data import prepare_data
from tests.conftest import snapshot, tiny_config


@flow
def _run_prepare(cfg):
    future = prepare_data.submit(cfg)
    future.wait()
    return future.state.name, future.result()


def test_second_run_is_a_cache_hit_that_writes_nothing(prefect_harness, tmp_path):
    cfg = tiny_config(tmp_path)
    state1, m1 = _run_prepare(cfg)
    assert state1 == "Completed"
    before = snapshot(tmp_path)
    assert any(p.endswith("manifest.json") for p in before)
    state2, m2 = _run_prepare(cfg)
    assert state2 == "Cached"
    assert m2 == m1
    assert snapshot(tmp_path) == before  # nothing written, nothing touched

    # A changed weight is a new key and a new output; the first output stays.
    state3, m3 = _run_prepare(tiny_config(tmp_path, **{"data.sources.0.weight": 2.5}))
    assert state3 == "Completed" and m3.key != m1.key
    assert {m.key for m in Store(str(tmp_path)).list_outputs("data")} == {m1.key, m3.key}


def test_data_flow_by_profile_name(prefect_harness, tmp_path):
    summary = data_flow(RunParams(profile="tiny", overrides={"storage.root": str(tmp_path)}))
    (m,) = Store(str(tmp_path)).list_outputs("data")
    assert set(summary["outputs"]) == {"data"} and summary["outputs"]["data"].endswith(m.key)


def test_s3_root_gives_the_same_content_ids(prefect_harness, s3_server, tmp_path):
    _, on_file = _run_prepare(tiny_config(tmp_path))
    _, on_s3 = _run_prepare(tiny_config("s3://rlhf-test/pipeline"))
    assert on_s3.key == on_file.key
    assert on_s3.content_id == on_file.content_id
    assert [(f.path, f.sha256) for f in on_s3.files] == [(f.path, f.sha256) for f in on_file.files]
    s3 = Store("s3://rlhf-test/pipeline")
    assert s3.read_manifest("data", on_s3.key) == on_s3
    # A second run against S3 is a cache hit too.
    state, again = _run_prepare(tiny_config("s3://rlhf-test/pipeline"))
    assert state == "Cached" and again.content_id == on_s3.content_id
