import json
import math

import numpy as np
import pytest
import torch

from attnmaps.data.image_io import write_mask
from attnmaps.metrics.report import evaluate_directories, format_iou_table, save_metrics


@pytest.fixture
def mask_dirs(tmp_path):
    """Two images; labels 0..2 in gt, 255 = ignore.

    a: gt [[0, 1], [1, 255]], pred [[0, 1], [2, 0]] -> pairs (0,0) (1,1) (1,2)
    b: gt [[2, 2, 0]],        pred [[2, 0, 0]]      -> pairs (2,2) (2,0) (0,0)
    IoU0 = 2 / (2 + 3 - 2) = 2/3, IoU1 = 1 / (2 + 1 - 1) = 1/2, IoU2 = 1 / (2 + 2 - 1) = 1/3.
    mIoU = 1/2, pixel acc = 4/6, mean acc = (1 + 1/2 + 1/2) / 3 = 2/3.
    """
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    write_mask(gt_dir / "a.png", np.array([[0, 1], [1, 255]], dtype=np.uint8))
    write_mask(pred_dir / "a.png", np.array([[0, 1], [2, 0]], dtype=np.uint8))
    write_mask(gt_dir / "b.png", np.array([[2, 2, 0]], dtype=np.uint8))
    write_mask(pred_dir / "b.png", np.array([[2, 0, 0]], dtype=np.uint8))
    return pred_dir, gt_dir


def test_evaluate_directories_hand_example(mask_dirs):
    result = evaluate_directories(*mask_dirs)
    assert result["per_class_iou"] == pytest.approx([2 / 3, 1 / 2, 1 / 3])
    assert result["miou"] == pytest.approx(1 / 2)
    assert result["pixel_acc"] == pytest.approx(4 / 6)
    assert result["mean_acc"] == pytest.approx(2 / 3)
    assert result["num_images"] == 2
    assert result["class_names"] == ["class_0", "class_1", "class_2"]
    assert result["confusion"] == [[2, 0, 0], [0, 1, 1], [1, 0, 1]]
    json.dumps(result, allow_nan=False)


def test_evaluate_directories_with_class_names_has_none_for_absent_label(mask_dirs):
    names = ["bg", "cat", "dog", "cow"]
    result = evaluate_directories(*mask_dirs, class_names=names)
    assert result["per_class_iou"][3] is None
    assert result["miou"] == pytest.approx(1 / 2)
    assert result["class_names"] == names
    with pytest.raises(ValueError, match=r"outside 0\.\.1.*a, b"):
        evaluate_directories(*mask_dirs, class_names=["bg", "cat"])


def test_evaluate_directories_rejects_missing_predictions(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    pred_dir.mkdir()
    for i in range(7):
        write_mask(gt_dir / f"img{i}.png", np.zeros((2, 2), dtype=np.uint8))
    write_mask(pred_dir / "img0.png", np.zeros((2, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"^6 .*img1, img2, img3, img4, img5 \(and 1 more\)"):
        evaluate_directories(pred_dir, gt_dir)


def test_evaluate_directories_rejects_size_mismatch_and_bad_predictions(mask_dirs):
    pred_dir, gt_dir = mask_dirs
    write_mask(pred_dir / "b.png", np.zeros((2, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"pred[/\\]b\.png.*gt[/\\]b\.png"):
        evaluate_directories(pred_dir, gt_dir)
    write_mask(pred_dir / "b.png", np.array([[2, 255, 0]], dtype=np.uint8))
    with pytest.raises(ValueError, match=r"outside 0\.\.2.*: b$"):
        evaluate_directories(pred_dir, gt_dir)


def test_save_metrics_writes_null_for_nan(tmp_path):
    path = tmp_path / "out" / "metrics.json"
    metrics = {"miou": 0.5, "per_class_iou": [0.5, math.nan], "confusion": torch.eye(2)}
    save_metrics(path, metrics)
    assert json.loads(path.read_text()) == {
        "miou": 0.5, "per_class_iou": [0.5, None], "confusion": [[1.0, 0.0], [0.0, 1.0]]
    }
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]


def test_format_iou_table():
    metrics = {"per_class_iou": [0.8123, None], "miou": 0.8123, "pixel_acc": 0.9, "mean_acc": 0.7}
    lines = format_iou_table(metrics, ["background", "cat"]).splitlines()
    assert lines[0].split() == ["class", "IoU", "(%)"]
    assert lines[1].split() == ["background", "81.23"]
    assert lines[2].split() == ["cat", "-"]
    assert lines[-3].split() == ["mIoU", "81.23"]
    assert lines[-2].split() == ["pixel", "acc", "90.00"]
    assert lines[-1].split() == ["mean", "acc", "70.00"]
    assert len({len(line) for line in lines}) == 1
    with pytest.raises(ValueError, match="3 class names for 2"):
        format_iou_table(metrics, ["a", "b", "c"])
