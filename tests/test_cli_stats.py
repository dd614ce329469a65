"""``attnmaps stats``: statistics of a configured dataset, printed and saved."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from attnmaps.cli import main
from attnmaps.data.image_io import read_image
from attnmaps.data.synthetic import write_synthetic_voc


def test_stats_command_prints_and_saves_the_training_split(tmp_path: Path, capsys) -> None:
    root = write_synthetic_voc(tmp_path / "data", num_train=6, num_val=2, size=(16, 16), seed=1)
    out = tmp_path / "stats.json"
    assert main(["stats", f"data.root={root}", "--out", str(out)]) == 0
    stats = json.loads(out.read_text())
    ids = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    pixels = np.stack([read_image(root / "JPEGImages" / f"{i}.png") for i in ids]) / 255.0
    assert stats["num_images"] == 6
    np.testing.assert_allclose(stats["mean"], pixels.reshape(-1, 3).mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["std"], pixels.reshape(-1, 3).std(0), rtol=1e-6)
    assert "data.mean=" in capsys.readouterr().out


def test_stats_command_reports_a_missing_dataset(tmp_path: Path, capsys) -> None:
    assert main(["stats", "data.name=voc", f"data.root={tmp_path / 'none'}"]) == 2
    assert "none" in capsys.readouterr().err
