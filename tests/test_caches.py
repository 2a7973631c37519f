"""Caches keyed by everything that decides them, and decode caches that fail cleanly on a full disk."""
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import common
import pipeline

ROOT = Path(__file__).resolve().parents[1]
CLASSES = {"Faces", "beaver", "cup", "ferry", "lotus", "panda"}


@pytest.fixture(scope="module")
def six_classes(tmp_path_factory):
    """6 real classes, 6 train + 2 test images each, 48 px."""
    from conftest import extract_subset

    return extract_subset(tmp_path_factory.mktemp("six"), per_class=8, classes=CLASSES, max_side=48)


def head_config(data, out, seed):
    defaults = dict(arch="efficientnet_lite0", batch_size=8, epochs=2, scratch_epochs=2, lr=1e-3,
                    weight_decay=1e-4, unfreeze="head", augment="none")
    args = common.get_args_parser(defaults).parse_args(
        ["--data", str(data), "--out", str(out), "--weights", "none", "--img-size", "32", "--workers", "0",
         "--precision", "fp32", "--unfreeze", "head", "--seed", str(seed), "--name", f"seed{seed}", "--cache-dir", str(out / "cache")])
    return common.resolve_config(args, defaults, "main_test")


def test_random_weights_of_two_seeds_get_two_feature_files_and_two_results(six_classes, tmp_path):
    first = common.fit(head_config(six_classes, tmp_path, 1))
    files_1 = sorted(p.name for p in (tmp_path / "cache").glob("features-*.pt"))
    assert len(files_1) == 3  # train, val, test
    second = common.fit(head_config(six_classes, tmp_path, 2))
    files_2 = sorted(p.name for p in (tmp_path / "cache").glob("features-*.pt"))
    assert len(files_2) == 6 and set(files_1) < set(files_2)
    import torch

    w1 = torch.load(tmp_path / "main_test" / "seed1" / "best.pth", weights_only=True)["model"]
    w2 = torch.load(tmp_path / "main_test" / "seed2" / "best.pth", weights_only=True)["model"]
    assert not torch.equal(w1["features.0.0.weight"], w2["features.0.0.weight"])
    assert (first["test_loss"], first["best_val_top1"]) != (second["test_loss"], second["best_val_top1"])
    # the same seed again reuses its own features, and gives the same result
    again = common.fit(dict(head_config(six_classes, tmp_path, 1), name="seed1-again"))
    assert len(list((tmp_path / "cache").glob("features-*.pt"))) == 6
    assert again["test_loss"] == first["test_loss"]
