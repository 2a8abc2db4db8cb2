import json
import random
from collections import OrderedDict

import numpy as np
import pytest
import torch

from rlhf_core.storage.checkpoint import CheckpointFormatError, capture_rng, load_tree, restore_rng, save_tree


def test_tree_round_trip_keeps_types(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    tree = {
        "w": torch.randn(3, 4), "bf": torch.ones(2, dtype=torch.bfloat16), 0: {"step": 5},
        "groups": [{"params": [0, 1], "lr": 1e-3, "betas": (0.9, 0.95)}], "shape": torch.Size([3, 4]),
        "od": OrderedDict(a=1), "s": {1, 2}, "inf": float("inf"), "none": None, "flag": True,
        "scaler": LossScaler(2.0), "stage": ZeroStageEnum.gradients,
        "frag": fragment_address(numel=4, start=8), "arr": np.arange(3, dtype=np.uint32),
    }
    save_tree(tree, str(tmp_path / "state.pt"))
    json.loads((tmp_path / "state.pt").read_text())  # structure is plain JSON, not a pickle
    back = load_tree(str(tmp_path / "state.pt"))
    assert torch.equal(back["w"], tree["w"]) and back["bf"].dtype == torch.bfloat16
    assert back[0] == {"step": 5} and back["groups"][0]["betas"] == (0.9, 0.95)
    assert back["shape"] == torch.Size([3, 4]) and isinstance(back["od"], OrderedDict) and back["s"] == {1, 2}
    assert back["inf"] == float("inf") and back["none"] is None and back["flag"] is True
    assert back["scaler"].cur_scale == 2.0 and back["stage"] is ZeroStageEnum.gradients
    assert back["frag"].numel == 4 and back["arr"].dtype == np.uint32 and back["arr"].tolist() == [0, 1, 2]


def test_foreign_objects_are_refused_on_save_and_load(tmp_path):
    class Evil:
        pass

    with pytest.raises(CheckpointFormatError, match="only DeepSpeed's own classes"):
        save_tree({"x": Evil()}, str(tmp_path / "a"))
    save_tree({"x": 1}, str(tmp_path / "b"))
    doc = json.loads((tmp_path / "b").read_text())
    doc["tree"] = {"__obj": "os.system", "state": {"__dict": []}}
    (tmp_path / "b").write_text(json.dumps(doc))
    with pytest.raises(CheckpointFormatError, match="not allowed"):
        load_tree(str(tmp_path / "b"))


def test_rng_capture_restore_replays_every_stream(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = capture_rng()
    first = (random.random(), np.random.rand(), torch.rand(2))
    save_tree(state, str(tmp_path / "rng"))
    random.random(), np.random.rand(), torch.rand(5)  # move every stream on
    restore_rng(load_tree(str(tmp_path / "rng")))
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])
