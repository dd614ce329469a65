"""Second stage: seeds with the ignore band, the loss, sliding-window inference, training and
resume, ``attnmaps segment / predict / report`` end to end on a tiny synthetic set."""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from attnmaps.cli import main
from attnmaps.config import load_config, save_config
from attnmaps.data.image_io import read_mask
from attnmaps.data.registry import build_dataset
from attnmaps.data.synthetic import write_synthetic_voc
from attnmaps.engine.train import train
from attnmaps.errors import ConfigError
from attnmaps.models.factory import create_model
from attnmaps.pseudo.masks import make_pseudo_masks, save_pseudo_masks
from attnmaps.pseudo.pamr import pamr
from attnmaps.segment import predictors
from attnmaps.segment import train as segment_train
from attnmaps.segment.evaluate import evaluate_segmenter
from attnmaps.segment.loss import balanced_class_weights, cross_entropy_ignore
from attnmaps.segment.model import load_segmenter
from attnmaps.segment.pipeline import segment_config
from attnmaps.segment.predict import sliding_window_logits, tile_starts, whole_logits
from attnmaps.segment.seeds import SeedDataset, uncertain_pixels
from attnmaps.segment.train import train_segmenter

TINY = ["model.img_size=32,32", "model.patch_size=8", "model.embed_dim=16", "model.depth=2",
        "model.num_heads=2", "train.batch_size=8", "train.epochs=1", "train.log_every=1",
        "model.attn_blocks=last2", "pseudo.refine_iterations=2"]
SEGMENT = ["segment.epochs=2", "segment.batch_size=8", "segment.decoder_dim=8",
           "segment.low_level_dim=4", "segment.ignore_margin=0.05", "segment.class_margin=0.05",
           "data.crop_scale=0.6,1.0"]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_synthetic_voc(tmp_path_factory.mktemp("synth"), num_train=16, num_val=6,
                               size=(32, 32), seed=5)
    run = tmp_path_factory.mktemp("stage1") / "run"
    train(load_config(None, [*TINY, f"data.root={root}", f"out_dir={run}"]))
    return run


@pytest.fixture(scope="module")
def stage2(stage1: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stage2") / "run"
    assert main(["segment", "--run", str(stage1), "--out", str(out), *SEGMENT]) == 0
    return out


def test_loss_ignores_255() -> None:
    logits = torch.randn(2, 3, 4, 5, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 5))
    target[0, :2] = 255
    loss = cross_entropy_ignore(logits, target)
    keep = target != 255
    log_probs = logits.log_softmax(1).permute(0, 2, 3, 1)[keep]
    expected = -log_probs.gather(1, target[keep][:, None]).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert logits.grad[0, :, :2].abs().sum() == 0 and logits.grad[1].abs().sum() > 0
    everything_ignored = cross_entropy_ignore(logits, torch.full_like(target, 255))
    assert everything_ignored.item() == 0.0


def test_weighted_loss_is_the_weighted_mean_over_labelled_pixels() -> None:
    logits = torch.randn(2, 3, 4, 5)
    target = torch.randint(0, 3, (2, 4, 5))
    target[1, 1:3] = 255
    weight = torch.tensor([0.2, 1.5, 3.0])
    loss = cross_entropy_ignore(logits, target, weight)
    keep = target != 255
    nll = -logits.log_softmax(1).permute(0, 2, 3, 1)[keep].gather(1, target[keep][:, None])[:, 0]
    expected = (weight[target[keep]] * nll).sum() / weight[target[keep]].sum()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target, weight=weight,
                                                     ignore_index=255))
    assert not torch.isclose(loss, cross_entropy_ignore(logits, target))


def test_balanced_class_weights_by_hand() -> None:
    counts = torch.tensor([900.0, 100.0, 25.0, 0.0, 400.0])  # median of the occurring: 250
    torch.testing.assert_close(balanced_class_weights(counts, 1.0),
                               torch.tensor([250 / 900, 2.5, 10.0, 0.0, 250 / 400]))
    torch.testing.assert_close(balanced_class_weights(counts, 0.5),
                               torch.tensor([(250 / 900) ** 0.5, 2.5 ** 0.5, 10 ** 0.5, 0.0,
                                             (250 / 400) ** 0.5]))
    torch.testing.assert_close(balanced_class_weights(counts, 0.0),
                               torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="no label occurs"):
        balanced_class_weights(torch.zeros(3), 1.0)


def test_seed_label_counts_on_hand_made_seeds(tmp_path: Path) -> None:
    root = write_synthetic_voc(tmp_path / "data", num_train=3, num_val=1, size=(8, 8), seed=1)
    base = build_dataset(load_config(None, [f"data.root={root}"]).data, "train", train=False)
    seeds = torch.zeros(2, 8, 8, dtype=torch.long)
    seeds[0, :2, :3] = 2   # 6 pixels of label 2
    seeds[0, 7] = 255      # a row ignored
    seeds[1, 4:, :] = 4    # 32 pixels of label 4
    save_pseudo_masks(tmp_path / "seeds", list(base.ids[:2]), seeds)  # the third image: no seed
    dataset = SeedDataset(base, tmp_path / "seeds")
    assert len(dataset) == 2
    counts = dataset.label_counts(6)
    assert counts.tolist() == [64 - 6 - 8 + 32, 0, 6, 0, 32, 0]


def test_stage2_trains_with_the_seeds_balanced_weights(stage1: Path, stage2: Path,
                                                       tmp_path: Path, monkeypatch) -> None:
    used = []

    class Recording(segment_train.SegmentationObjective):
        def __init__(self, weight=None):
            super().__init__(weight)
            used.append(weight)

    monkeypatch.setattr(segment_train, "SegmentationObjective", Recording)
    out = tmp_path / "weighted"
    cfg = segment_config(stage1, out, [*SEGMENT, "segment.epochs=1",
                                       "segment.class_weight_power=0.5"])
    save_config(cfg, out / "config.yaml")
    shutil.copytree(stage2 / "seeds", out / "seeds")
    train_segmenter(cfg)
    pixels = np.concatenate([read_mask(p).ravel() for p in sorted((out / "seeds").glob("*.png"))])
    counts = torch.tensor(np.bincount(pixels[pixels != 255], minlength=5)[:5], dtype=torch.float64)
    torch.testing.assert_close(used[0].cpu(), balanced_class_weights(counts, 0.5))
    assert (used[0] != 1).any()


def test_ignore_band_on_a_hand_made_map() -> None:
    # one image, 3 classes (class 2 absent), 1 x 6 pixels; threshold 0.5, margins 0.1 / 0.2
    scores = torch.tensor([[[[0.45, 0.70, 0.90, 0.62, 0.30, 0.59]],
                            [[0.10, 0.20, 0.80, 0.55, 0.35, 0.00]],
                            [[0.99, 0.99, 0.99, 0.99, 0.99, 0.99]]]])
    selected = torch.tensor([[True, True, False]])
    band = uncertain_pixels(scores, selected, threshold=0.5, ignore_margin=0.1, class_margin=0.2)
    # pixel: best two selected | near threshold |s1-0.5|<0.1 | both >= 0.5 and s1-s2 < 0.2
    # 0: .45/.10 yes | 1: .70/.20 no,no | 2: .90/.80 no, yes | 3: .62/.55 no, yes
    # 4: .35/.30 no (0.15), no | 5: .59/.00 yes
    assert band.tolist() == [[[True, False, True, True, False, True]]]
    nothing = uncertain_pixels(scores, selected, 0.5, ignore_margin=0.0, class_margin=0.0)
    assert not nothing.any()


class ConvNet(torch.nn.Module):
    """Receptive field radius 2 (two 3x3 convolutions, zero padding)."""

    size_multiple = 1

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Tanh(),
                                       torch.nn.Conv2d(4, 2, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("size", [(21, 34), (16, 16), (7, 40), (5, 6)])
def test_sliding_window_equals_whole_image_when_the_receptive_field_fits(size) -> None:
    torch.manual_seed(0)
    net, images = ConvNet(), torch.randn(2, 3, *size)
    with torch.no_grad():
        whole = whole_logits(net, images)
        slid = sliding_window_logits(net, images, (12, 16), overlap=4)  # overlap // 2 = 2
        torch.testing.assert_close(slid, whole, atol=1e-5, rtol=1e-5)
        narrow = sliding_window_logits(net, images, (12, 16), overlap=2)  # margin 1 < radius 2
    if size[1] > 16:
        assert not torch.allclose(narrow, whole, atol=1e-5)


def test_tile_starts_cover_the_length() -> None:
    for length, size, stride in [(20, 8, 4), (8, 8, 4), (33, 16, 12)]:
        starts = tile_starts(length, size, stride)
        assert starts[0] == 0 and starts[-1] == length - size
        assert all(b - a <= stride for a, b in itertools.pairwise(starts))


def test_patch_blocks_are_the_tokens_before_the_final_norm() -> None:
    cfg = load_config(None, TINY)
    model = create_model(cfg.model, 3).eval()
    out = model.forward_features(torch.randn(2, 3, 32, 40), patch_blocks=[0, 1])
    assert [tuple(t.shape) for t in out["blocks"]] == [(2, 20, 16)] * 2
    torch.testing.assert_close(model.norm(out["blocks"][1]), out["patch"])


def test_segment_writes_seeds_scores_and_a_checkpoint(stage1: Path, stage2: Path) -> None:
    metrics = json.loads((stage2 / "metrics.json").read_text())
    for key in ("miou", "per_class_iou", "confusion", "per_image"):
        assert key in metrics["stage2"]
    assert len(metrics["stage2"]["per_image"]) == 6
    seeds = metrics["seeds"]
    assert 0 <= seeds["ignored_fraction"] < 1 and seeds["miou_true_labels"] > 0
    seed_files = sorted((stage2 / "seeds").glob("*.png"))
    assert len(seed_files) == 16
    assert set(np.unique(np.concatenate([read_mask(p).ravel() for p in seed_files]))) <= \
        set(range(5)) | {255}
    assert metrics["stage1_val"]["miou"] >= 0
    records = [json.loads(line) for line in (stage2 / "log.jsonl").read_text().splitlines()]
    assert sum("eval" in r for r in records) == 2


def test_segment_resume_equals_an_uninterrupted_run(stage1: Path, stage2: Path,
                                                    tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    cfg = segment_config(stage1, broken, SEGMENT)
    save_config(cfg, broken / "config.yaml")
    shutil.copytree(stage2 / "seeds", broken / "seeds")

    class Interrupt(Exception):
        pass

    def stop(epoch: int, metrics: dict) -> None:
        raise Interrupt

    with pytest.raises(Interrupt):
        train_segmenter(cfg, on_epoch=stop)
    train_segmenter(cfg, resume=True)
    a, b = load_file(stage2 / "last.safetensors"), load_file(broken / "last.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_segment_refuses_an_existing_run_without_resume(stage1: Path, stage2: Path,
                                                        tmp_path: Path, capsys) -> None:
    assert main(["segment", "--run", str(stage1), "--out", str(stage2)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["segment", "--run", str(stage1), "--out", str(tmp_path / "new"),
                 "segment.overlap=40", "segment.window=32,32"]) == 2
    assert "segment.overlap" in capsys.readouterr().err


def _odd_images(folder: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir()
    files = {
        "wide.png": Image.fromarray(rng.integers(0, 255, (23, 57, 3), dtype=np.uint8)),
        "odd.jpg": Image.fromarray(rng.integers(0, 255, (33, 31, 3), dtype=np.uint8)),
        "grey.png": Image.fromarray(rng.integers(0, 255, (40, 24), dtype=np.uint8), "L"),
        "rgba.png": Image.fromarray(rng.integers(0, 255, (9, 70, 4), dtype=np.uint8), "RGBA"),
        "wide2.png": Image.fromarray(rng.integers(0, 255, (23, 57, 3), dtype=np.uint8)),
    }
    for name, image in files.items():
        image.save(folder / name)
    (folder / "broken.png").write_bytes(b"not an image")
    return [folder / name for name in files]


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_predict_any_size_greyscale_rgba_and_a_broken_file(stage: str, request, tmp_path: Path,
                                                           caplog) -> None:
    run = request.getfixturevalue(stage)
    images = _odd_images(tmp_path / "images")
    out = tmp_path / "out"
    code = main(["predict", "--model", str(run), "--images", str(tmp_path / "images"),
                 str(tmp_path / "missing.png"), "--out", str(out), "--batch-size", "2",
                 "--inference", "resize"])
    assert code == 0
    assert "broken.png" in caplog.text and "missing.png" in caplog.text
    for path in images:
        size = Image.open(path).size
        mask = read_mask(out / f"{path.stem}.png")
        assert mask.shape == (size[1], size[0]) and mask.max() <= 4
        overlay = Image.open(out / f"{path.stem}_overlay.png")
        assert overlay.mode == "RGB" and overlay.size[0] > size[0]


def test_report_is_one_self_contained_file(stage2: Path) -> None:
    assert main(["report", str(stage2)]) == 0
    page = (stage2 / "report.html").read_text()
    assert "http://" not in page and "https://" not in page and "src='data:image/png" in page
    for part in ("Per-class IoU", "Confusion matrix", "best", "worst", "circle", "Config"):
        assert part in page


def test_report_of_a_stage1_run_says_what_it_needs(stage1: Path, capsys) -> None:
    assert main(["report", str(stage1)]) == 2
    assert "attnmaps segment" in capsys.readouterr().err


def test_smp_models_when_installed() -> None:
    try:
        import segmentation_models_pytorch  # noqa: F401
    except ImportError as error:  # also raised where torchvision does not load
        pytest.skip(f"segmentation_models_pytorch cannot be imported: {error}")
    from attnmaps.segment.model import create_segmenter

    cfg = load_config(None, [*TINY, "segment.arch=smp", "segment.smp_arch=Unet",
                             "segment.smp_encoder=resnet18"])
    net = create_segmenter(cfg.model, cfg.segment, num_classes=4, num_labels=5)
    logits = whole_logits(net.eval(), torch.randn(1, 3, 40, 50))
    assert logits.shape == (1, 5, 40, 50)
    loss = cross_entropy_ignore(net(torch.randn(2, 3, 64, 64)), torch.zeros(2, 64, 64).long())
    loss.backward()
    assert F.relu(loss).item() >= 0


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(stage2: Path, tmp_path: Path) -> None:
    main(["report", str(stage2)])
    shot = tmp_path / "report.png"
    script = Path(__file__).parents[1] / "benchmarks" / "report_screenshot.sh"
    subprocess.run(["bash", str(script), str(stage2 / "report.html"), str(shot), "800,1200"],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (1200, 800) and pixels.std() > 10  # not a blank page


def test_smp_missing_names_the_extra() -> None:
    try:
        import segmentation_models_pytorch  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("segmentation_models_pytorch is installed")
    from attnmaps.segment.model import create_segmenter

    cfg = load_config(None, [*TINY, "segment.arch=smp"])
    with pytest.raises(ImportError, match=r"attnmaps\[smp\]"):
        create_segmenter(cfg.model, cfg.segment, num_classes=4, num_labels=5)


@pytest.mark.parametrize("merge", ["probability", "weighted"])
def test_stage1_predictor_merges_with_the_run_s_rule(stage1: Path, merge: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    predictor = predictors.load_predictor(stage1, device="cpu")
    predictor.cfg = dataclasses.replace(
        predictor.cfg, pseudo=dataclasses.replace(predictor.cfg.pseudo, merge=merge))
    rules = []

    def recording(*args, **kwargs):
        rules.append(kwargs["merge"])
        return make_pseudo_masks(*args, **kwargs)

    monkeypatch.setattr(predictors, "make_pseudo_masks", recording)
    masks, _ = predictor(torch.rand(2, 3, 40, 36))
    assert rules == [merge] and masks.shape == (2, 40, 36)


def _miou_by_hand(preds: list[np.ndarray], masks: list[np.ndarray], num_labels: int) -> float:
    """mIoU over the classes that occur in the truth or the prediction, 255 left out."""
    pred, true = np.concatenate([p.ravel() for p in preds]), np.concatenate([m.ravel() for m in
                                                                             masks])
    keep = true != 255
    pred, true = pred[keep], true[keep]
    ious = [((pred == c) & (true == c)).sum() / ((pred == c) | (true == c)).sum()
            for c in range(num_labels) if ((pred == c) | (true == c)).any()]
    return float(np.mean(ious))


def _refined_by_hand(images: torch.Tensor, probs: torch.Tensor, iterations: int) -> torch.Tensor:
    """Each image's labels that win a pixel, PAMR-refined one map at a time; the others 0."""
    out = torch.zeros_like(probs)
    for b in range(len(probs)):
        for label in probs[b].argmax(0).unique():
            out[b, label] = pamr(images[b:b + 1], probs[b:b + 1, label:label + 1], iterations)[0, 0]
    return out


def test_stage2_refinement_is_pamr_on_the_network_s_probabilities(stage1: Path,
                                                                  stage2: Path) -> None:
    net, seg, names = load_segmenter(stage2 / "last.safetensors")
    assert seg.refine_iterations == 2  # TINY's pseudo.refine_iterations, taken over
    torch.manual_seed(0)
    with torch.no_grad():  # the tiny run labels nearly everything background: vary its output
        for parameter in net.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    cfg = load_config(stage2 / "config.yaml")
    dataset = build_dataset(cfg.data, cfg.data.val_split, train=False)
    refined, raw, masks = [], [], []
    with torch.no_grad():
        for i in range(len(dataset)):
            sample = dataset[i]
            image = sample["image"][None]
            probs = sliding_window_logits(net, image, tuple(seg.window), seg.overlap).softmax(1)
            refined.append(_refined_by_hand(image, probs, 2).argmax(1)[0].numpy())
            raw.append(probs.argmax(1)[0].numpy())
            masks.append(sample["mask"].numpy())
    scores = evaluate_segmenter(net, dataset, seg, len(names))
    assert scores["refine_iterations"] == 2
    assert scores["miou"] == pytest.approx(_miou_by_hand(refined, masks, len(names)), abs=1e-6)
    assert scores["raw_miou"] == pytest.approx(_miou_by_hand(raw, masks, len(names)), abs=1e-6)
    unrefined = evaluate_segmenter(net, dataset, seg, len(names), refine=False)
    assert unrefined["refine_iterations"] == 0 and "raw_miou" not in unrefined
    assert unrefined["miou"] == pytest.approx(scores["raw_miou"], abs=1e-9)
    assert any((a != b).any() for a, b in zip(refined, raw))  # the refinement changed pixels
    predictor = predictors.load_predictor(stage2, device="cpu")
    predictor.net = net
    images = torch.stack([dataset[i]["image"] for i in range(3)])
    predicted, probs = predictor(images)

    def expected_raw(images: torch.Tensor) -> torch.Tensor:
        return sliding_window_logits(net, images, tuple(seg.window), seg.overlap).softmax(1)

    expected = _refined_by_hand(images, expected_raw(images), 2)
    assert torch.equal(predicted, expected.argmax(1))
    torch.testing.assert_close(probs, expected[:, predictor.label_offset:])
    unrefined_predictor = predictors.load_predictor(stage2, device="cpu", refine_iterations=0)
    unrefined_predictor.net = net
    assert torch.equal(unrefined_predictor(images)[0], expected_raw(images).argmax(1))
    metrics = json.loads((stage2 / "metrics.json").read_text())["stage2"]
    assert metrics["refine_iterations"] == 2 and "raw_miou" in metrics


def test_stage2_refinement_setting(stage1: Path, tmp_path: Path) -> None:
    assert segment_config(stage1, tmp_path, []).segment.refine_iterations == 2
    off = segment_config(stage1, tmp_path, ["segment.refine_iterations=0"])
    assert off.segment.refine_iterations == 0
    with pytest.raises(ConfigError, match="segment.refine_iterations"):
        segment_config(stage1, tmp_path, ["segment.refine_iterations=-1"])
