"""reward.existing: a reward model by key or URL instead of training one (small fake outputs, no training)."""

import pytest

from rlhf_core.stages import registry as stages
from rlhf_core.config import ConfigError
from rlhf_core.stages.existing import existing_reward, import_reward
from rlhf_core.storage.store import Store
from tests.conftest import tiny_config


def _reward(store: Store, key="a" * 20, payload=b"weights"):
    with store.open_output("data", "d" * 20) as out:
        out.write_bytes("x.arrow", b"rows")
        data = out.commit(stage_version=1, config={})
    with store.open_output("reward", key) as out:
        out.write_bytes("model/model.safetensors", payload)
        out.write_json("model/reward_model.json", {"score_mean": 0.0})
        return out.commit(stage_version=1, config={}, upstream={"data": data}, metrics={"eval_accuracy": 0.9},
                          producer={"flow_run_name": "trainer-run"})


def test_by_key_in_this_store(tmp_path):
    store = Store(str(tmp_path / "here"))
    m = _reward(store)
    for ref in (m.key, f"reward/{m.key}"):
        cfg = tiny_config(tmp_path / "here", **{"reward.existing": ref})
        source, found = existing_reward(cfg)
        assert found == m
        assert import_reward(source, found, store) == m  # already here: nothing copied
    assert existing_reward(tiny_config(tmp_path / "here")) is None


def test_by_url_from_another_store_is_imported_with_the_same_key_and_content(tmp_path):
    there, here = Store(str(tmp_path / "there")), Store(str(tmp_path / "here"))
    m = _reward(there)
    url = there.url_of("reward", m.key)
    cfg = tiny_config(tmp_path / "here", **{"reward.existing": url + "/"})
    source, found = existing_reward(cfg)
    copy = import_reward(source, found, here, producer={"flow_run_name": "actor-run"})
    assert (copy.key, copy.content_id, copy.files, copy.upstream, copy.created_at) == (
        m.key, m.content_id, m.files, m.upstream, m.created_at)
    assert copy.producer["flow_run_name"] == "trainer-run"  # lineage still names the run that trained it
    assert copy.producer["imported_from"] == url and copy.producer["imported_by"] == {"flow_run_name": "actor-run"}
    assert here.read_manifest("reward", m.key) == copy
    assert here.read_bytes("reward", m.key, "model/model.safetensors") == b"weights"
    # PPO's key depends on the reward output's content, not on where it lives.
    assert copy.content_id == there.read_manifest("reward", m.key).content_id


def test_by_s3_url_into_a_file_store(tmp_path, s3_server):
    there, here = Store("s3://rlhf-test/shared-rewards"), Store(str(tmp_path / "here"))
    m = _reward(there, key="b" * 20)
    cfg = tiny_config(tmp_path / "here", **{"reward.existing": there.url_of("reward", m.key)})
    copy = import_reward(*existing_reward(cfg), here)
    assert copy.content_id == m.content_id and here.has_output("reward", m.key)


def test_a_url_without_a_manifest_is_refused_with_the_url(tmp_path):
    missing = f"file://{tmp_path}/nowhere/reward/{'c' * 20}"
    with pytest.raises(ConfigError, match=rf"no manifest.json at {missing}/manifest.json"):
        existing_reward(tiny_config(tmp_path / "here", **{"reward.existing": missing}))
    with pytest.raises(ConfigError, match=r"holds no complete reward output.*rlhf store ls --stage reward"):
        existing_reward(tiny_config(tmp_path / "here", **{"reward.existing": "c" * 20}))


def test_a_url_of_another_stage_or_a_malformed_value_is_refused(tmp_path):
    store = Store(str(tmp_path / "here"))
    _reward(store)
    with pytest.raises(ConfigError, match="is a 'data' output, not a reward model"):
        existing_reward(tiny_config(tmp_path / "here", **{"reward.existing": store.url_of("data", "d" * 20)}))
    with pytest.raises(ConfigError, match="reward.existing 'best-rm' is neither a reward key"):
        tiny_config(tmp_path, **{"reward.existing": "best-rm"})
    with pytest.raises(ConfigError, match="scheme 'http' is not supported"):
        tiny_config(tmp_path, **{"reward.existing": "http://example.com/rm"})


def test_same_key_with_other_content_is_refused(tmp_path):
    there, here = Store(str(tmp_path / "there")), Store(str(tmp_path / "here"))
    m = _reward(there)
    _reward(here, payload=b"other weights")
    cfg = tiny_config(tmp_path / "here", **{"reward.existing": there.url_of("reward", m.key)})
    with pytest.raises(ConfigError, match="already holds a reward model with the same key and other content"):
        existing_reward(cfg)


def test_a_source_changed_after_it_was_written_is_not_imported(tmp_path):
    there, here = Store(str(tmp_path / "there")), Store(str(tmp_path / "here"))
    m = _reward(there)
    (tmp_path / "there" / "reward" / m.key / "model" / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(ValueError, match="does not match its manifest"):
        import_reward(Store(there.url_of("reward", m.key)), m, here)
    assert not here.has_output("reward", m.key)  # nothing visible


def test_reward_existing_is_not_part_of_the_reward_key(tmp_path):
    store = Store(str(tmp_path))
    data = _reward(store).upstream  # just to have a store; the key needs a data manifest
    data = store.read_manifest("data", data["data"])
    plain = tiny_config(tmp_path)
    assert stages.key("reward", tiny_config(tmp_path, **{"reward.existing": "a" * 20}), {"data": data}) == stages.key("reward", plain, {"data": data})
    assert stages.key("reward", tiny_config(tmp_path, **{"reward.epochs": 2}), {"data": data}) != stages.key("reward", plain, {"data": data})


def test_a_folder_whose_manifest_is_not_a_manifest_is_refused(tmp_path):
    folder = tmp_path / "there" / "reward" / ("e" * 20)
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text('{"hello": 1}')
    with pytest.raises(ConfigError, match="manifest.json is not a stage manifest"):
        existing_reward(tiny_config(tmp_path / "here", **{"reward.existing": f"file://{folder}"}))


def test_a_copy_missing_files_is_never_committed(tmp_path):
    there, here = Store(str(tmp_path / "there")), Store(str(tmp_path / "here"))
    m = _reward(there)
    with pytest.raises(ValueError, match="are not those of reward/"):
        with here.open_output("reward", m.key) as out:
            out.copy_in(Store(there.url_of("reward", m.key)), m.files[0].path, m.files[0])
            out.commit_copy(m, {})
    assert not here.has_output("reward", m.key)


def test_the_import_task_needs_reward_existing(tmp_path):
    from tasks.train_reward import use_reward_model

    with pytest.raises(ConfigError, match="use-reward-model needs reward.existing"):
        use_reward_model.fn(tiny_config(tmp_path))
