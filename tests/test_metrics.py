import math

import pytest
import torch
import torch.distributed as dist
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassJaccardIndex,
    MultilabelAveragePrecision,
)

from attnmaps.metrics.classification import MultiLabelMetric, average_precision, head_sparsity
from attnmaps.metrics.segmentation import SegmentationMetric, confusion_matrix


def random_batches(num_labels: int, num_batches: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        target = torch.randint(0, num_labels, (2, 7, 9), generator=gen)
        target[torch.rand(target.shape, generator=gen) < 0.2] = 255
        pred = torch.randint(0, num_labels, (2, 7, 9), generator=gen)
        batches.append((pred, target))
    return batches


def test_segmentation_matches_torchmetrics():
    num_labels = 5
    ours = SegmentationMetric(num_labels)
    jaccard = MulticlassJaccardIndex(num_labels, average=None, ignore_index=255)
    confmat = MulticlassConfusionMatrix(num_labels, ignore_index=255)
    accuracy = MulticlassAccuracy(num_labels, average="micro", ignore_index=255)
    for pred, target in random_batches(num_labels):
        ours.update(pred, target)
        jaccard.update(pred, target)
        confmat.update(pred, target)
        accuracy.update(pred, target)
    result = ours.compute()
    assert torch.equal(result["confusion"], confmat.compute())
    assert result["per_class_iou"] == pytest.approx(jaccard.compute().tolist(), abs=1e-6)
    assert result["miou"] == pytest.approx(jaccard.compute().mean().item(), abs=1e-6)
    assert result["pixel_acc"] == pytest.approx(accuracy.compute().item(), abs=1e-6)
    cm = confmat.compute().double()
    recall = [cm[c, c] / cm[c].sum() for c in range(num_labels)]
    assert result["mean_acc"] == pytest.approx(sum(recall).item() / num_labels)


def test_segmentation_hand_example_with_ignore_and_absent_label():
    target = torch.tensor([[0, 0, 1], [1, 255, 2], [255, 2, 2]])
    pred = torch.tensor([[0, 1, 1], [1, 3, 2], [255, 2, 0]])
    # Valid pixels (gt, pred): (0,0) (0,1) (1,1) (1,1) (2,2) (2,2) (2,0).
    # IoU0 = 1 / (2 + 2 - 1) = 1/3, IoU1 = 2 / (2 + 3 - 2) = 2/3, IoU2 = 2 / (3 + 2 - 2) = 2/3.
    # Label 3 is only predicted at an ignored pixel: union 0 -> NaN, left out of the mean.
    # mIoU = (1/3 + 2/3 + 2/3) / 3 = 5/9; pixel acc = 5/7; mean acc = (1/2 + 1 + 2/3) / 3 = 13/18.
    metric = SegmentationMetric(num_labels=4)
    metric.update(pred, target)
    result = metric.compute()
    assert result["per_class_iou"][:3] == pytest.approx([1 / 3, 2 / 3, 2 / 3])
    assert math.isnan(result["per_class_iou"][3])
    assert result["miou"] == pytest.approx(5 / 9)
    assert result["pixel_acc"] == pytest.approx(5 / 7)
    assert result["mean_acc"] == pytest.approx(13 / 18)
    assert result["confusion"].dtype == torch.int64
    assert result["confusion"].sum().item() == 7


def test_accumulation_over_batches_equals_one_shot():
    batches = random_batches(num_labels=3, seed=1)
    batched, per_image, one_shot = (SegmentationMetric(3) for _ in range(3))
    for pred, target in batches:
        batched.update(pred, target)
        for p, t in zip(pred, target):
            per_image.update(p, t)
    one_shot.update(torch.cat([p for p, _ in batches]), torch.cat([t for _, t in batches]))
    expected = one_shot.compute()
    for metric in (batched, per_image):
        result = metric.compute()
        assert torch.equal(result["confusion"], expected["confusion"])
        assert result["miou"] == expected["miou"]
    batched.reset()
    assert batched.confusion.sum().item() == 0


def test_confusion_matrix_rejects_out_of_range_predictions():
    target = torch.tensor([[0, 1], [255, 1]])
    with pytest.raises(ValueError, match=r"prediction values \[3, 7\]"):
        confusion_matrix(torch.tensor([[3, 1], [0, 7]]), target, num_labels=3)
    with pytest.raises(ValueError, match="integer"):
        confusion_matrix(torch.zeros(2, 2), target, num_labels=3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(2, 3, dtype=torch.long), target, num_labels=3)


@pytest.mark.filterwarnings("ignore:No positive samples")
def test_map_matches_torchmetrics_with_ties_and_class_without_positives():
    gen = torch.Generator().manual_seed(2)
    num_classes = 5
    reference = MultilabelAveragePrecision(num_classes, average=None)
    ours = MultiLabelMetric(num_classes)
    for _ in range(3):
        probs = (torch.rand(6, num_classes, generator=gen) * 10).round() / 10  # many ties
        labels = (torch.rand(6, num_classes, generator=gen) < 0.4).long()
        labels[:, 4] = 0
        ours.update(probs, labels)
        reference.update(probs, labels)
    expected = reference.compute()[:4]
    result = ours.compute()
    assert result["per_class_ap"][:4] == pytest.approx(expected.tolist(), abs=1e-6)
    assert math.isnan(result["per_class_ap"][4])
    assert result["map"] == pytest.approx(expected.mean().item(), abs=1e-6)


def test_average_precision_hand_example():
    # Ranked: 0.9 (pos), 0.8 (neg), 0.7 (pos): AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    scores = torch.tensor([0.7, 0.9, 0.8])
    assert average_precision(scores, torch.tensor([True, True, False])) == pytest.approx(5 / 6)


def test_exact_match_label_accuracy_and_f1_hand_example():
    probs = torch.tensor([[0.9, 0.2, 0.5], [0.6, 0.7, 0.1], [0.1, 0.4, 0.8]])
    labels = torch.tensor([[1, 0, 1], [0, 1, 0], [0, 0, 1]])
    # Decisions (>= 0.5): [1,0,1] exact; [1,1,0] one false positive; [0,0,1] exact.
    # exact_match = 2/3, label_accuracy = 8/9, micro F1 = 2*4 / (2*4 + 1 + 0) = 8/9.
    metric = MultiLabelMetric(num_classes=3)
    metric.update(probs[:2], labels[:2])
    metric.update(probs[2:], labels[2:])
    result = metric.compute()
    assert result["exact_match"] == pytest.approx(2 / 3)
    assert result["label_accuracy"] == pytest.approx(8 / 9)
    assert result["f1"] == pytest.approx(8 / 9)
    metric.reset()
    with pytest.raises(ValueError, match="before any update"):
        metric.compute()
    with pytest.raises(ValueError, match="labels"):
        metric.update(probs, labels[:, :2])


def test_compute_in_a_single_process_group_is_repeatable(tmp_path):
    seg = SegmentationMetric(3)
    pred, target = random_batches(num_labels=3, num_batches=1)[0]
    seg.update(pred, target)
    expected = seg.compute()["confusion"]
    cls = MultiLabelMetric(2)
    cls.update(torch.tensor([[0.9, 0.1]]), torch.tensor([[1, 0]]))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        for _ in range(2):
            assert torch.equal(seg.compute()["confusion"], expected)
            assert cls.compute()["exact_match"] == 1.0
    finally:
        dist.destroy_process_group()
    assert torch.equal(seg.confusion, expected)


def test_head_sparsity():
    gates = torch.tensor([[0.0, 1.0, 0.0, 0.5], [1.0, 1.0, 0.0, 1e-6]])
    assert head_sparsity(gates) == pytest.approx(37.5)
    with pytest.raises(ValueError, match="empty"):
        head_sparsity(torch.zeros(0))
