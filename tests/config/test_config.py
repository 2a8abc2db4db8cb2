from pathlib import Path

import pytest

from rlhf_core.config import PROFILES_DIR, ConfigError, load_config, parse_override

PROFILES = sorted(p.stem for p in Path(PROFILES_DIR).glob("*.yaml"))


def test_the_four_profiles_exist():
    assert {"tiny", "single_gpu", "single_node", "multi_node"} <= set(PROFILES)


@pytest.mark.parametrize("name", PROFILES)
def test_every_profile_loads_and_validates(name):
    cfg = load_config(name)
    assert cfg.data.sources and cfg.models.actor and cfg.models.reward
    # Frozen after validation.
    with pytest.raises(Exception):
        cfg.rl.kl.coef = 1.0  # type: ignore[misc]


def test_profiles_follow_deepspeed_chat_deployments():
    single, node, multi = (load_config(n) for n in ("single_gpu", "single_node", "multi_node"))
    assert single.models.actor.name_or_path == "facebook/opt-1.3b"
    assert node.models.actor.name_or_path == "facebook/opt-13b"
    assert multi.models.actor.name_or_path == "facebook/opt-66b"
    for cfg in (single, node, multi):
        assert cfg.models.reward.name_or_path == "facebook/opt-350m"
        assert cfg.data.max_prompt_tokens == 256 and cfg.rl.generation.max_answer_len == 256
        assert cfg.resources.device == "cuda"
    assert multi.resources.nnodes > 1 and multi.resources.launcher == "deepspeed"


def test_override_sets_nested_value_and_list_item():
    cfg = load_config("tiny", ["rl.kl.coef=0.25", "data.sources.0.weight=3", "sft.deepspeed.extra={a: 1}"])
    assert cfg.rl.kl.coef == 0.25
    assert cfg.data.sources[0].weight == 3
    assert cfg.sft.deepspeed.extra == {"a": 1}


def test_storage_root_is_an_override_key(tmp_path):
    cfg = load_config("tiny", {"storage.root": f"file://{tmp_path}"})
    assert cfg.storage.root == f"file://{tmp_path}"


@pytest.mark.parametrize(
    "override, expect",
    [
        ("rl.kl.coeff=1", "unknown key 'rl.kl.coeff': rl.kl has adaptive, coef, estimator, horizon, target"),
        ("nonsense=1", "unknown key 'nonsense'"),
        ("rl.kl.coef.x=1", "rl.kl.coef is a value, not a section"),
        ("data.sources.5.weight=1", "data.sources is a list of 1 entries"),
    ],
)
def test_unknown_keys_are_rejected_with_what_is_allowed(override, expect):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override])
    assert expect in str(e.value)


@pytest.mark.parametrize(
    "override, expect",
    [
        ("rl.kl.estimator=k4", "rl.kl.estimator: Input should be 'k1', 'k2' or 'k3', got 'k4'"),
        ("sft.deepspeed.zero_stage=5", "sft.deepspeed.zero_stage"),
        ("data.sources.0.weight=0", "data.sources.0.weight: Input should be greater than 0"),
        ("data.sources.0.weight=-1", "data.sources.0.weight"),
        ("data.split=1,x,2", "split must be three integers"),
        ("ema.beta=2", "ema.beta: Input should be less than or equal to 1"),
        ("sft.deepspeed.offload_params=true", "offload_params needs zero_stage 3"),
        ("rl.train_micro_batch_size=5", "must be a multiple of train_micro_batch_size (5)"),
    ],
)
def test_bad_values_name_the_key(override, expect):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override])
    assert expect in str(e.value)


def test_unknown_profile_lists_known_ones():
    with pytest.raises(ConfigError, match="unknown profile 'nope': known profiles are .*tiny"):
        load_config("nope")


def test_malformed_override():
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        parse_override("rl.kl.coef")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_override("a.b=[1,")


def test_mixture_needs_a_corpus():
    with pytest.raises(ConfigError, match="needs data.ptx.path"):
        load_config("tiny", {"mixture.ptx_coef": 0.5, "data.ptx.path": None})


def test_lengths_must_fit_the_actor():
    with pytest.raises(ConfigError, match="exceeds the actor's 64 positions"):
        load_config("tiny", {"rl.generation.max_answer_len": 60})


# ------------------------------------------------------------------------------------------ step-3 algorithms


@pytest.mark.parametrize(
    "overrides, expect",
    [
        ({"rl.algorithm": "grpo"}, "rl.algorithm grpo compares the answers to one prompt, but rl.n_samples_per_prompt is 1"),
        ({"rl.algorithm": "rloo", "rl.n_samples_per_prompt": 1}, "set it to 2 or more"),
        ({"rl.algorithm": "reinforce_pp", "rl.n_samples_per_prompt": 3, "rl.train_micro_batch_size": 64},
         "n_samples_per_prompt (96) must be a multiple of train_micro_batch_size (64)"),  # 32 prompts x 3 answers
        ({"rl.algorithm": "vtrace"}, "rl.algorithm: Input should be 'ppo', 'grpo', 'rloo', 'reinforce_pp' or 'dpo'"),
        ({"reward.use_model": False}, "rl.algorithm ppo needs a reward: set reward.function"),
        ({"reward.function": "tiny_task.gold_reward"}, "reward.function 'tiny_task.gold_reward' is not a function reference"),
        ({"eval.gold_reward": "rlhf_core/data/tiny_task.py"}, "eval.gold_reward 'rlhf_core/data/tiny_task.py' is not"),
        ({"eval.reward_model": False, "eval.gold_reward": None}, "eval.reward_model false leaves evaluation nothing"),
        ({"rl.dpo.label_smoothing": 0.5}, "rl.dpo.label_smoothing: Input should be less than 0.5"),
        ({"rl.policy_loss": "dual_clip"}, "rl.policy_loss: Input should be 'ppo_clip' or 'gspo'"),
    ],
)
def test_bad_algorithm_settings_name_the_key(overrides, expect):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides)
    assert expect in str(e.value)


def test_algorithm_settings_and_their_derived_values():
    ppo = load_config("tiny")
    assert (ppo.rl.algorithm, ppo.rl.advantage_estimator, ppo.rl.uses_critic, ppo.rl.whiten) == ("ppo", "gae", True, True)
    grpo = load_config("tiny", {"rl.algorithm": "grpo", "rl.n_samples_per_prompt": 4, "rl.rollout_batch_size": 8})
    assert (grpo.rl.uses_critic, grpo.rl.whiten, grpo.rl.rows_per_step) == (False, False, 32)
    rpp = load_config("tiny", {"rl.algorithm": "reinforce_pp", "rl.whiten_advantages": False})
    assert rpp.rl.whiten is False  # an explicit setting wins over the algorithm's own
    # DPO has no rollouts: the rollout batch need not divide into micro-batches
    assert load_config("tiny", {"rl.algorithm": "dpo", "rl.train_micro_batch_size": 5}).rl.algorithm == "dpo"
    # a rule alone needs no reward model; the old gold_reward names still work
    rule = load_config("tiny", {"reward.use_model": False, "reward.function": "rlhf_core.data.tiny_task:gold_reward"})
    assert rule.reward.function == "rlhf_core.data.tiny_task:gold_reward"
    assert load_config("tiny", {"eval.gold_reward": "tiny_task"}).eval.gold_reward == "rlhf_core.data.tiny_task:gold_reward"
    assert load_config("tiny", {"eval.gold_reward": "none"}).eval.gold_reward is None


def test_config_choices_match_the_maths_registries():
    """The schema names what the torch-only maths implements (the config layer does not import torch)."""
    import typing

    from rlhf_core.config import schema
    from rlhf_core.maths import algos
    from rlhf_core.maths.advantages import ADVANTAGE_ESTIMATORS
    from rlhf_core.maths.preference import PREFERENCE_LOSSES

    assert set(typing.get_args(schema.PolicyLoss)) == set(algos.POLICY_LOSSES)
    assert typing.get_args(schema.LossAgg) == typing.get_args(algos.LossAgg)
    assert set(typing.get_args(schema.PreferenceLossType)) == set(PREFERENCE_LOSSES)
    algorithms = set(typing.get_args(schema.RLAlgorithm)) - {"dpo"}
    assert {load_config("tiny", {"rl.algorithm": a, "rl.n_samples_per_prompt": 2}).rl.advantage_estimator
            for a in algorithms} == set(ADVANTAGE_ESTIMATORS)
    assert set(schema.ALGORITHM_NAMES) == set(typing.get_args(schema.RLAlgorithm))


# ------------------------------------------------------------------------------------------------ paths


def test_bundled_profiles_load_from_any_working_directory(tmp_path, monkeypatch):
    from rlhf_core.config.profiles import BUNDLED_DIR

    monkeypatch.chdir(tmp_path)
    cfg = load_config("tiny")
    assert cfg.data.sources[0].path == str(BUNDLED_DIR / "tiny_task")
    assert cfg.data.ptx.path == str(BUNDLED_DIR / "ptx_corpus.txt")
    assert cfg.models.actor.tokenizer == str(BUNDLED_DIR / "tiny_tokenizer")


def test_a_relative_path_resolves_against_the_working_directory_not_the_checkout(tmp_path, monkeypatch):
    import shutil

    from rlhf_core.config.profiles import BUNDLED_DIR

    (tmp_path / "data").mkdir()
    shutil.copy(BUNDLED_DIR / "ptx_corpus.txt", tmp_path / "data" / "ptx_corpus.txt")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("tiny", ["data.ptx.path=data/ptx_corpus.txt"])
    assert cfg.data.ptx.path == str(tmp_path / "data" / "ptx_corpus.txt")
    # The checkout holds data/ptx_corpus.txt too, but the user's relative path never reaches it: from a folder
    # without the file, the same override is refused (negative control of the above).
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert (BUNDLED_DIR.parent / "data" / "ptx_corpus.txt").exists()
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["data.ptx.path=data/ptx_corpus.txt"])
    msg = str(e.value)
    assert "data.ptx.path: 'data/ptx_corpus.txt' does not exist" in msg
    assert f"resolved against the working directory {tmp_path / 'elsewhere'}" in msg and "bundled://" in msg


def test_a_missing_relative_source_names_the_directory_it_was_resolved_against(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"data\.sources\.0\.path: 'data/mine' does not exist: relative paths are "
                                          r"resolved against the working directory " + str(tmp_path)):
        load_config("tiny", ["data.sources.0.path=data/mine"])


def test_an_unknown_bundled_name_lists_what_is_bundled():
    with pytest.raises(ConfigError, match=r"'bundled://nope' is not bundled data: .* holds bundled://ptx_corpus.txt, "
                                          r"bundled://tiny_task, bundled://tiny_tokenizer"):
        load_config("tiny", ["data.ptx.path=bundled://nope"])


def test_hub_names_stay_hub_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("single_gpu")
    assert cfg.models.actor.name_or_path == "facebook/opt-1.3b"
    (tmp_path / "facebook" / "opt-1.3b").mkdir(parents=True)  # a local folder of that name wins, as in a shell
    assert load_config("single_gpu").models.actor.name_or_path == str(tmp_path / "facebook" / "opt-1.3b")
    with pytest.raises(ConfigError, match="models.actor.name_or_path: './my-model' does not exist"):
        load_config("single_gpu", ["models.actor.name_or_path=./my-model"])


def test_the_same_bytes_give_the_same_keys_from_any_place(tmp_path, monkeypatch):
    """Cache keys hold content: the bundled data and a user's copy of it under a relative path, loaded from
    another working directory, give the same data key; a changed byte gives another."""
    import shutil

    from rlhf_core.config.profiles import BUNDLED_DIR
    from rlhf_core.stages import registry

    for name in ("tiny_task", "tiny_tokenizer", "ptx_corpus.txt"):
        copy = shutil.copytree if (BUNDLED_DIR / name).is_dir() else shutil.copy
        copy(BUNDLED_DIR / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    mine = ["data.sources.0.path=tiny_task", "data.ptx.path=ptx_corpus.txt", "models.actor.tokenizer=tiny_tokenizer"]
    bundled, copied = load_config("tiny"), load_config("tiny", mine)
    assert copied.data.sources[0].path == str(tmp_path / "tiny_task")
    assert registry.key("data", bundled) == registry.key("data", copied)
    (tmp_path / "ptx_corpus.txt").write_text((tmp_path / "ptx_corpus.txt").read_text() + "one more line .\n")
    assert registry.key("data", bundled) != registry.key("data", load_config("tiny", mine))
