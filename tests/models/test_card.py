"""Model cards: the Hugging Face metadata header, and no path or clock in a card."""

from rlhf_core.config import ModelSpec
from rlhf_core.models.card import CardMeta, base_name, card_metadata, hub_base, hub_datasets, model_card


def test_the_card_opens_with_hugging_face_metadata():
    meta = CardMeta(base_model="facebook/opt-1.3b", datasets=("Dahoas/rm-static",), tags=("rlhf", "ppo"),
                    results={"reward_last": ("reward", "reward-model score"), "missing": ("x", "not measured")})
    card = model_card("final actor", "facebook/opt-1.3b", "About.", {"reward_last": 1.5, "train_seconds": 9.0}, meta)
    assert card.startswith("---\nbase_model: facebook/opt-1.3b\n")
    head = card_metadata(card)
    assert head["datasets"] == ["Dahoas/rm-static"] and head["library_name"] == "transformers"
    assert head["tags"] == ["rlhf-flow", "rlhf", "ppo"]
    (index,) = head["model-index"]
    (result,) = index["results"]
    assert result["task"]["type"] == "text-generation"
    assert result["dataset"] == {"type": "Dahoas/rm-static", "name": "Dahoas/rm-static", "split": "held-out"}
    assert result["metrics"] == [{"type": "reward", "name": "reward-model score", "value": 1.5}]
    assert "# final actor" in card and "train_seconds" not in card  # run facts stay in the manifest


def test_a_card_without_known_results_or_base_has_no_index_and_no_base():
    head = card_metadata(model_card("SFT actor", "opt built from config"))
    assert head == {"library_name": "transformers", "tags": ["rlhf-flow"]}
    assert card_metadata("# no header") == {}


def test_a_local_base_is_named_by_content_not_by_its_path(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    specs = [ModelSpec(name_or_path=str(tmp_path / n)) for n in ("a", "b")]
    assert base_name(specs[0]) == base_name(specs[1]) and base_name(specs[0]).startswith("a local model (content ")
    assert str(tmp_path) not in base_name(specs[0]) and hub_base(specs[0]) is None
    assert hub_base(ModelSpec(name_or_path="facebook/opt-350m")) == "facebook/opt-350m"


def test_hub_datasets_of_a_data_output():
    config = {"data": {"sources": [{"name": "Dahoas/rm-static"}, {"name": "local/jsonfile", "path": "/x"},
                                   {"name": "files", "path": "/y"}, {"name": "Anthropic/hh-rlhf", "path": "/z"},
                                   {"name": "Dahoas/rm-static"}]}}
    assert hub_datasets(config) == ("Dahoas/rm-static", "Anthropic/hh-rlhf")
