"""The baselines of scripts/eval_default.py measure what they claim: recalling the training
set finds an object that is in it (nearest neighbour by input mask and the oracle both score
mask IoU 1), and scores below 1 against another object's views."""

from __future__ import annotations

import pytest

from scripts.eval_default import retrieval_baseline
from train.data.synthetic import write_synthetic_dataset


def test_retrieval_recalls_an_object_of_its_training_set(tmp_path):
    folders = write_synthetic_dataset(tmp_path / "train", num_objects=4, image_size=32, num_cond=1, seed=5)
    result = retrieval_baseline(folders, tmp_path / "train", 32)
    assert result["training_objects"] == 4
    assert result["mask_iou"] == 1.0 and result["oracle_mask_iou"] == 1.0
    assert result["mask_iou_other"] < 0.95
    held_out = write_synthetic_dataset(tmp_path / "heldout", num_objects=3, image_size=32, num_cond=1, seed=6)
    other = retrieval_baseline(held_out, tmp_path / "train", 32)
    assert other["mask_iou"] <= other["oracle_mask_iou"] < 1.0  # the oracle bounds the nearest neighbour
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no complete object folder"):
        retrieval_baseline(folders, tmp_path / "empty", 32)
