"""What every stage task shares, when the store cannot be reached: no Prefect cache key (and no traceback
from computing one), one StoreUnavailable naming the store, and a lease that never masks the error."""

import botocore.exceptions
import pytest

from rlhf_core.stages import registry
from rlhf_core.storage.store import Store, StoreUnavailable
from tasks.runner import cache_key_fn, run_once
from tests.conftest import tiny_config


def _down(*args, **kwargs):
    raise botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:9/bucket/x")


def test_no_cache_key_while_the_store_cannot_be_reached(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path / "store")
    fn = cache_key_fn(registry.DATA)
    assert fn(None, {"cfg": cfg}) is None  # nothing in the store yet
    monkeypatch.setattr(Store, "manifest_id", _down)
    assert fn(None, {"cfg": cfg}) is None  # the task meets the store next and says what is wrong
    monkeypatch.setattr(Store, "manifest_id", lambda *a: (_ for _ in ()).throw(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):  # negative control: not every error is an outage
        fn(None, {"cfg": cfg})


@pytest.mark.parametrize("where", ["before the lease", "while running"])
def test_a_stage_whose_store_goes_away_fails_with_store_unavailable(tmp_path, monkeypatch, where):
    cfg = tiny_config(tmp_path / "store")
    if where == "before the lease":
        monkeypatch.setattr(Store, "read_manifest", _down)
        run = lambda lease: pytest.fail("ran without a store")  # noqa: E731
    else:
        def run(lease):
            # The store dies while the stage runs: the lease cannot be released either.
            monkeypatch.setattr(Store, "read_manifest", _down)
            monkeypatch.setattr(Store, "write_bytes_atomic", _down)
            monkeypatch.setattr(type(lease.store.fs), "cat_file", _down)
            _down()
    with pytest.raises(StoreUnavailable, match=r"the store file://.*/store cannot be reached \(EndpointConnectionError"):
        run_once(cfg, registry.SFT, "k" * 20, {}, run)
