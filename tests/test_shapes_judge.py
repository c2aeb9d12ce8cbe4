"""The shapes judge: per-attribute classifiers of generated shapes images (no mirroring, spatial head)."""

import numpy as np
import pytest
import torch

from ldmkit.data.shapes import heldout_pairs, load_shapes
from ldmkit.eval.classifier import EvalClassifier
from ldmkit.eval.shapes_judge import ATTRIBUTES, judge_config, load_judge, seen_mask
from ldmkit.train.eval_classifier import augment
from ldmkit.train.shapes_judge import train_judge


def test_augment_without_flip_only_shifts():
    x = torch.zeros(64, 3, 32, 32, dtype=torch.uint8)
    x[:, :, 10, 5] = 255
    out = augment(x, torch.Generator().manual_seed(0), max_shift=1, flip=False)
    cols = out[:, 0].nonzero()[:, 2]
    assert (out.flatten(1).sum(1) == 3 * 255).all() and set(cols.tolist()) <= {4, 5, 6}  # never mirrored


def test_flat_head_reads_position_and_keeps_average_features():
    model = EvalClassifier(judge_config(9, "position")).eval()
    x = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    logits, feats = model.logits_and_features(x)
    assert logits.shape == (4, 9) and feats.shape == (4, model.feature_dim)
    assert model.head.in_features == model.feature_dim * 8 * 8  # the 8x8 map, flattened
    torch.testing.assert_close(model(x), logits)


def test_seen_mask_marks_heldout_pairs():
    held = heldout_pairs()
    ds = load_shapes("test", num=400, seed=3)
    seen = seen_mask(ds.labels["shape"].numpy(), ds.labels["color"].numpy(), held)
    names = [(ds.label_names["shape"][s], ds.label_names["color"][c])
             for s, c in zip(ds.labels["shape"].tolist(), ds.labels["color"].tolist())]
    assert seen.tolist() == [pair not in held for pair in names]
    assert seen.any() and (~seen).any()


def test_train_and_load_judge_round_trip(tmp_path, one_thread):
    metrics = train_judge(tmp_path / "judge", steps=4, images=256, progress=False)
    assert set(metrics["accuracy"]) == set(ATTRIBUTES)
    models, hashes, held = load_judge(tmp_path / "judge")
    assert held == heldout_pairs() and set(hashes) == set(ATTRIBUTES)
    x = load_shapes("test", num=8, seed=1).images.permute(0, 2, 3, 1)
    for a in ATTRIBUTES:
        assert models[a](x).shape == (8, {"shape": 6, "color": 6, "position": 9}[a])
    with pytest.raises(FileNotFoundError, match="shapes-judge"):
        load_judge(tmp_path)


def test_judge_accuracy_splits_seen_and_heldout():
    from ldmkit.eval.shapes_judge import judge_accuracy

    class Fixed(torch.nn.Module):  # predicts class 0 for every image
        def logits_and_features(self, x):
            n = x.shape[0]
            return torch.nn.functional.one_hot(torch.zeros(n, dtype=torch.long), 3).float(), torch.zeros(n, 1)

        def eval(self):
            return self

        training = False

    labels = {"shape": np.array([0, 1, 0, 0])}
    seen = np.array([True, True, False, False])
    acc = judge_accuracy({"shape": Fixed()}, torch.zeros(4, 32, 32, 3, dtype=torch.uint8), labels, seen)
    assert acc["shape"] == {"all": 0.75, "seen": 0.5, "heldout": 1.0}
