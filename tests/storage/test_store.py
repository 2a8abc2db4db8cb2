import json

import pytest

from rlhf_core.storage.store import MANIFEST, Store, content_id


def _write(store: Store, stage="s", key="k", files=None):
    with store.open_output(stage, key) as out:
        for rel, data in (files or {"a.bin": b"abc", "sub/b.json": b"{}"}).items():
            out.write_bytes(rel, data)
        return out.commit(stage_version=1, config={"x": 1}, metrics={"m": 2})


def test_manifest_is_written_last_and_lists_files(tmp_path):
    store = Store(str(tmp_path))
    m = _write(store)
    assert [f.path for f in m.files] == ["a.bin", "sub/b.json"]
    assert m.file("a.bin").size == 3
    assert m.content_id == content_id(m.files)
    assert store.read_manifest("s", "k") == m
    assert json.loads((tmp_path / "s" / "k" / MANIFEST).read_text())["metrics"] == {"m": 2}
    assert m.versions["python"] and m.versions["torch"]


def test_output_without_manifest_is_invisible_and_overwritten(tmp_path):
    store = Store(str(tmp_path))
    with pytest.raises(RuntimeError, match="not committed"):
        with store.open_output("s", "k") as out:
            out.write_bytes("half.bin", b"x")  # crash before commit
    assert (tmp_path / "s" / "k" / "half.bin").exists()
    assert store.read_manifest("s", "k") is None and not store.has_output("s", "k")
    assert store.list_outputs() == []
    m = _write(store)  # the next attempt cleans the leftovers
    assert not (tmp_path / "s" / "k" / "half.bin").exists()
    assert store.list_outputs() == [m]


def test_complete_output_is_never_overwritten(tmp_path):
    store = Store(str(tmp_path))
    _write(store)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        with store.open_output("s", "k"):
            pass


def test_content_id_depends_on_content_only(tmp_path):
    a = _write(Store(str(tmp_path / "a")))
    b = _write(Store(f"file://{tmp_path / 'b'}"))
    c = _write(Store(str(tmp_path / "c")), files={"a.bin": b"abd", "sub/b.json": b"{}"})
    assert a.content_id == b.content_id != c.content_id


def test_checkpoints_need_a_complete_marker(tmp_path):
    store = Store(str(tmp_path))
    assert store.latest_checkpoint("s", "k") is None
    for step in (10, 20, 30):
        with store.write_checkpoint("s", "k", step, keep=2) as d:
            (tmp_path / "s" / "k" / "checkpoints" / f"step-{step:06d}" / "w.bin").write_bytes(b"w")
            assert d.endswith(f"step-{step:06d}")
    # A checkpoint whose writer died before the marker does not count.
    half = tmp_path / "s" / "k" / "checkpoints" / "step-000040"
    half.mkdir()
    (half / "w.bin").write_bytes(b"partial")
    assert store.list_checkpoints("s", "k") == [20, 30]  # pruned to keep=2
    assert store.latest_checkpoint("s", "k") == 30


def test_checkpoints_survive_a_new_output_attempt(tmp_path):
    store = Store(str(tmp_path))
    with store.write_checkpoint("s", "k", 5, keep=1):
        pass
    m = _write(store)
    assert store.latest_checkpoint("s", "k") == 5 and m.stage == "s"


def test_delete_output_removes_manifest_first(tmp_path):
    store = Store(str(tmp_path))
    _write(store)
    store.delete_output("s", "k")
    assert not (tmp_path / "s" / "k").exists()


def test_s3_store_round_trip(s3_server, tmp_path):
    store = Store("s3://rlhf-test/store-unit")
    m = _write(store)
    assert store.read_manifest("s", "k") == m
    with store.write_checkpoint("s", "k", 7, keep=2) as d:
        (tmp_path / "x").write_text("y")
        import shutil

        shutil.copy(tmp_path / "x", d)
    assert store.latest_checkpoint("s", "k") == 7
    local = store.fetch_checkpoint("s", "k", 7)
    assert open(f"{local}/x").read() == "y"
    assert store.read_bytes("s", "k", "a.bin") == b"abc"


# ------------------------------------------------------------------------- a store that cannot be reached


def test_unreachable_names_the_s3_clients_connection_failures_and_nothing_else():
    import botocore.exceptions
    import httpx

    from rlhf_core.storage.store import unreachable

    down = botocore.exceptions.EndpointConnectionError(endpoint_url="http://x")
    try:
        try:
            raise down
        except botocore.exceptions.EndpointConnectionError:
            raise RuntimeError("wrapped by a library")  # the outage is its context
    except RuntimeError as e:
        chained = e
    assert unreachable(down) and unreachable(chained)
    assert unreachable(botocore.exceptions.ReadTimeoutError(endpoint_url="http://x"))
    # Negative controls: a missing object, a refused permission, a bug, and a connection refused by Prefect's
    # API (not the store) are not store outages.
    assert not any(unreachable(e) for e in (FileNotFoundError("k"), PermissionError(13, "denied"), ValueError("bug"),
                                            ConnectionRefusedError(111, "refused"), httpx.ConnectError("refused"), None))


@pytest.mark.slow
def test_a_dead_s3_endpoint_reads_as_unreachable(monkeypatch):
    """What s3fs raises when nothing listens at the endpoint (it retries for about 12 s first)."""
    import socket

    from rlhf_core.storage.store import StoreUnavailable, unavailable, unreachable

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = Store("s3://bucket/rlhf", endpoint_url=f"http://127.0.0.1:{port}")
    with pytest.raises(Exception) as info:
        store.read_manifest("sft", "k" * 20)
    assert unreachable(info.value)
    error = unavailable(store.url, info.value)
    assert isinstance(error, StoreUnavailable) and "\n" not in str(error)
    assert str(error).startswith("the store s3://bucket/rlhf cannot be reached (EndpointConnectionError")
    assert "run the same command again" in str(error)
