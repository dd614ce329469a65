"""The speed and memory benchmarks run (their --quick modes, tiny shapes) and write JSON whose
deterministic parts hold: byte counts and label agreement, never a timing."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = ["--img-size", "32", "--embed-dim", "32", "--depth", "2", "--heads", "2"]


def import_benchmark(name: str) -> ModuleType:
    """The benchmark script ``name`` as a module (its folder on the import path while it
    loads, for its ``_measure`` import)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def run_benchmark(script: str, args: list[str], tmp_path: Path,
                  env: dict[str, str] | None = None) -> dict:
    out = tmp_path / f"{script}.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / f"{script}.py"), "--quick", *args,
                           "--out", str(out)], check=False, capture_output=True, text=True,
                           timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())


def with_fake_timm(tmp_path: Path, source: str) -> dict[str, str]:
    """The environment with a ``timm`` package of ``source`` first on the import path."""
    package = tmp_path / "fake" / "timm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(source)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(package.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}


def test_train_step_keeps_less_for_backward_than_the_reference(tmp_path: Path) -> None:
    result = run_benchmark("train_step", [*TINY, "--explain"], tmp_path)
    saved = result["saved_for_backward_bytes"]
    assert saved["attnmaps"] < saved["reference"]
    assert result["throughput_ratio"] > 0 and len(result["step_seconds"]["attnmaps"]) == 5
    assert result["compile_graphs"] == {"graphs": 1, "graph_breaks": 0, "reasons": []}


def test_timm_compare_skips_where_timm_cannot_import(tmp_path: Path) -> None:
    env = with_fake_timm(tmp_path, "raise ImportError('torchvision does not load')\n")
    result = run_benchmark("timm_compare", TINY, tmp_path, env)
    assert "torchvision does not load" in result["skipped"]


STAND_IN_TIMM = """import torch
__version__ = "stand-in"


def create_model(name, pretrained, num_classes, img_size, **shape):
    assert name == "vit_base_patch16_224" and not pretrained
    return torch.nn.Sequential(torch.nn.Flatten(),
                               torch.nn.Linear(3 * img_size ** 2, num_classes))
"""


def test_timm_compare_times_both_models_compiled(tmp_path: Path) -> None:
    # A stand-in for timm.create_model (the real one needs torchvision): the script's own path.
    env = with_fake_timm(tmp_path, STAND_IN_TIMM)
    result = run_benchmark("timm_compare", [*TINY, "--compile", "--backend", "aot_eager"],
                           tmp_path, env)
    assert set(result["images_per_second"]) == {"attnmaps", "timm"}
    assert result["throughput_ratio"] > 0 and result["config"]["timm"] == "stand-in"


def test_data_pipeline_reports_worker_loader_and_epoch_rates(tmp_path: Path) -> None:
    result = run_benchmark("data_pipeline", ["--workers", "0,1", "--set",
                                             "train.batch_size=16"], tmp_path)
    assert set(result["per_worker_images_per_second"]) == {"decode", "decode + augment"}
    assert set(result["loader_images_per_second"]) == {"0", "1"}
    assert len(result["epoch_seconds"]) == len(result["step_seconds"]) == 2
    assert result["epoch_over_step"] > 0 and result["config"]["batch_size"] == 16


def test_attention_kernel_covers_both_dtypes_and_modes(tmp_path: Path) -> None:
    results = run_benchmark("attention_kernel", [], tmp_path)["results"]
    assert {(r["dtype"], r["mode"]) for r in results} == {
        (dtype, mode) for dtype in ("fp32", "bf16") for mode in ("train", "eval")}
    assert {r["dtype"]: r["auto"] for r in results} == {"fp32": "fused", "bf16": "explicit"}


def test_pseudo_mask_speed_agrees_with_the_reference_on_claimed_pixels(tmp_path: Path) -> None:
    agreement = run_benchmark("pseudo_mask_speed", [], tmp_path)["agreement"]
    assert agreement["claimed_pixels"] == 1.0 and agreement["filled_pixels"] > 0.99


def test_pamr_speed_refines_as_the_stacked_form(tmp_path: Path) -> None:
    result = run_benchmark("pamr_speed", [], tmp_path)
    assert result["max_difference"] < 1e-5 and set(result["seconds"]) == {"attnmaps", "stacked"}


def test_class_attention_memory_grows_linearly_not_quadratically(tmp_path: Path) -> None:
    growth = run_benchmark("class_attention_memory", [], tmp_path)["growth_exponent"]
    for per_k in growth.values():
        assert per_k["attnmaps_tokens"] == pytest.approx(1.0, abs=1e-6)
        assert per_k["reference_tokens"] == pytest.approx(2.0, abs=1e-6)


def test_class_attention_keeps_less_than_all_blocks_at_many_classes(tmp_path: Path) -> None:
    saved = run_benchmark("num_classes_scaling", TINY, tmp_path)["saved_for_backward_bytes"]
    assert saved["class attention:151"] < saved["all blocks:151"]
    assert saved["all blocks:20"] < saved["all blocks:151"]


def test_crf_speed_reports_both_backends_and_their_agreement(tmp_path: Path) -> None:
    result = run_benchmark("crf_speed", [], tmp_path)
    assert result["seconds_per_image"]["torch"] > 0
    assert result["seconds_per_image"]["torch exact"] > 0
    if "pydensecrf" in result["seconds_per_image"]:
        assert result["synthetic_pixels_agree"] >= 0.95
        assert result["synthetic_pixels_agree_exact"] >= 0.95


@pytest.mark.slow
def test_stem_cost_counts_the_stem_s_multiply_adds(tmp_path: Path) -> None:
    result = run_benchmark("stem_cost", ["--batch-size", "2"], tmp_path)["results"]
    # digits.yaml: 96 x 96 images, patch 8 -> stages of 32, 48 and 96 channels at 48, 24 and 12 px
    stride2 = 48 * 48 * 32 * 3 * 9 + 24 * 24 * 48 * 32 * 9 + 12 * 12 * 96 * 48 * 9
    stride1 = 48 * 48 * 32 * 32 * 9 + 24 * 24 * 48 * 48 * 9 + 12 * 12 * 96 * 96 * 9
    projection = 12 * 12 * 96 * 96
    for depth in (1, 2, 3):
        expected = stride2 + (depth - 1) * stride1 + projection
        assert result[f"{depth} per stage"]["stem_multiply_adds_M"] * 1e6 == pytest.approx(expected)
    assert result["2 per stage"]["ratio_to_2"] == 1.0
    assert result["3 per stage, contiguous"]["stem_multiply_adds_M"] == pytest.approx(
        result["3 per stage"]["stem_multiply_adds_M"])
    assert result["1 per stage"]["stem_parameters"] < result["3 per stage"]["stem_parameters"]
    for depth in (2, 3):  # 64 x 64 images: every feature map (2/3)^2 the size of the 96 px one
        assert result[f"{depth} per stage, 64x64 images"]["stem_multiply_adds_M"] == pytest.approx(
            result[f"{depth} per stage"]["stem_multiply_adds_M"] * 4 / 9)


@pytest.mark.slow
def test_small_data_quick_scores_raw_and_refined_maps(tmp_path: Path) -> None:
    pytest.importorskip("mlxtend")
    done = subprocess.run([sys.executable, str(BENCHMARKS / "small_data.py"), "--quick",
                           "--jobs", "2", "--out", str(tmp_path)], check=False,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "small_data_tune.json").read_text())
    assert 0.0 <= report["floor_miou"] <= 1.0
    assert set(report["summary"]) == {"recipe", "no prior bias", "merge by probability"}
    assert (tmp_path / "small_data_tune.png").read_bytes()[:4] == b"\x89PNG"
    for row in report["summary"].values():
        for key in ("map", "raw_miou", "raw_miou_true_labels", "miou", "miou_true_labels"):
            assert 0.0 <= row[key][0] <= 1.0
        assert row["train_cpu_seconds"][0] > 0
    # a pseudo-only variant is scored on the recipe's run: same model, same training time
    recipe, merged = report["summary"]["recipe"], report["summary"]["merge by probability"]
    assert merged["map"] == recipe["map"]
    assert merged["train_cpu_seconds"] == recipe["train_cpu_seconds"]
    assert not (tmp_path / "merge_by_probability_seed0" / "last.safetensors").exists()
    # a score cached under other pseudo-mask settings (an older recipe) is made again
    cached = tmp_path / "recipe_seed0" / "score_tune.json"
    stale = {**json.loads(cached.read_text()), "miou": -1.0}
    stale["pseudo"]["merge"] = "map"
    cached.write_text(json.dumps(stale))
    again = subprocess.run([sys.executable, str(BENCHMARKS / "small_data.py"), "--quick",
                            "--out", str(tmp_path)], check=False, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    rescored = json.loads(cached.read_text())
    assert rescored["miou"] == recipe["miou"][0] and rescored["pseudo"]["merge"] == "weighted"


def test_small_data_variants_are_valid_configs(tmp_path: Path) -> None:
    small_data = import_benchmark("small_data")
    from attnmaps.config import load_config

    configs = {name: load_config(small_data.CONFIG, [*overrides, f"data.root={tmp_path}"])
               for name, overrides in small_data.VARIANTS.items()}  # none is a config error
    assert configs["recipe"].pseudo.maps == "fused"
    assert configs["no patch head"].pseudo.maps == "attention"


def test_small_data_refuses_a_finished_run_trained_with_other_settings(tmp_path: Path) -> None:
    small_data = import_benchmark("small_data")
    from attnmaps.config import load_config, save_config

    run, data = tmp_path / "recipe_seed0", tmp_path / "data"
    run.mkdir()
    (run / "timing.json").write_text("{}")
    overrides = [f"data.root={data}", f"out_dir={run}", "train.seed=0", "data.val_split=tune",
                 "pseudo.refine_iterations=0"]
    save_config(load_config(small_data.CONFIG, overrides), run / "config.yaml")
    assert small_data.train_one(tmp_path, data, [], "recipe", 0) == run  # the same: read back
    save_config(load_config(small_data.CONFIG, [*overrides, "train.epochs=40",
                                                "data.early_size_epochs=0"]),
                run / "config.yaml")  # the tenth round's recipe
    recipe = load_config(small_data.CONFIG, overrides)
    expected = (f"early_size_epochs: 0 -> {recipe.data.early_size_epochs}"
                f".*train.epochs: 40 -> {recipe.train.epochs}")
    with pytest.raises(SystemExit, match=expected):
        small_data.train_one(tmp_path, data, [], "recipe", 0)


def test_raw_map_ceiling_oracle(tmp_path: Path) -> None:
    raw_map_ceiling = import_benchmark("raw_map_ceiling")
    import torch

    masks = torch.tensor([[[1, 1, 0, 0], [1, 255, 0, 2], [0, 0, 2, 2], [0, 0, 2, 2]]])
    shares = raw_map_ceiling.oracle_maps(masks, 2, 2)  # by hand: class pixels per 2x2 patch / 4
    assert torch.equal(shares, torch.tensor([[[[0.75, 0.0], [0.0, 0.0]],
                                              [[0.0, 0.25], [0.0, 1.0]]]]))
    report = run_benchmark("raw_map_ceiling", ["--patch-sizes", "1,8"], tmp_path)
    assert report["best"]["oracle, patch 1"] == 1.0  # pixel-sized patches: the masks themselves
    assert 0.0 < report["best"]["oracle, patch 8"] < 1.0


def test_raw_map_error_shares_by_hand() -> None:
    raw_map_ceiling = import_benchmark("raw_map_ceiling")
    import torch

    confusion = torch.tensor([[50, 6, 4],   # truth background: 10 pixels given to objects
                              [8, 10, 2],   # truth class 1: 8 lost to background, 2 to class 2
                              [2, 0, 18]])  # truth class 2: 2 lost to background
    shares = raw_map_ceiling.error_shares(confusion)  # 40 object predictions, 28 correct
    assert shares == pytest.approx({"predicted_object_on_background": 10 / 40,
                                    "predicted_object_on_other_class": 2 / 40,
                                    "true_object_as_background": 10 / 40,
                                    "true_object_as_other_class": 2 / 40})


def tiny_trained_run(tmp_path: Path, *overrides: str) -> Path:
    """A 1-epoch run of a tiny ViT with a patch head and fused maps on 16 synthetic 32-px
    images (8 `val` images)."""
    from attnmaps.config import load_config
    from attnmaps.data.synthetic import write_synthetic_voc
    from attnmaps.engine.train import train

    root = write_synthetic_voc(tmp_path / "data", num_train=16, num_val=8, size=(32, 32), seed=3)
    run = tmp_path / "run"
    train(load_config(None, ["model.img_size=32,32", "model.patch_size=8", "model.embed_dim=16",
                             "model.depth=1", "model.num_heads=2", "model.patch_head=true",
                             "pseudo.maps=fused", "train.epochs=1", "train.batch_size=8",
                             *overrides, f"data.root={root}", f"out_dir={run}"]))
    return run


def test_raw_map_scores_of_a_run_match_the_evaluator(tmp_path: Path) -> None:
    raw_map_ceiling = import_benchmark("raw_map_ceiling")
    from dataclasses import replace

    from torch.utils.data import DataLoader

    from attnmaps.data.registry import build_dataset
    from attnmaps.engine.evaluate import eval_options, evaluate
    from attnmaps.pipeline import load_run

    run = tiny_trained_run(tmp_path, "pseudo.merge=weighted", "pseudo.tta_scales=[1.0,0.75]")
    cfg, model = load_run(run)
    dataset = build_dataset(cfg.data, "val", train=False)
    scores = raw_map_ceiling.run_scores(run, DataLoader(dataset, batch_size=3),
                                        dataset.num_classes)
    for threshold in (0.2, 0.4):
        settings = replace(cfg.pseudo, refine_iterations=0, threshold=threshold)
        expected = evaluate(model, dataset, settings, **eval_options(cfg))["miou_true_labels"]
        assert scores["miou_by_threshold"][threshold] == pytest.approx(expected, abs=1e-6)
    assert scores["best_threshold"] in raw_map_ceiling.THRESHOLDS


def test_cnn_probe_residual_network() -> None:
    cnn_probe = import_benchmark("cnn_probe")
    import torch

    block = cnn_probe.ResidualBlock(4, 4, 1)
    torch.nn.init.zeros_(block.body[-1].weight)  # the body's last BN outputs its bias, 0
    x = torch.randn(2, 4, 6, 6)
    assert torch.equal(block(x), torch.relu(x))  # only the identity shortcut is left
    features = cnn_probe.residual_features(8).eval()
    assert features(torch.randn(2, 3, 32, 48)).shape == (2, 32, 4, 6)
    model = cnn_probe.PooledCNN(5, features, 32, "max")
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 5)


def test_classifier_gap_scores_both_heads_and_their_ensemble() -> None:
    classifier_gap = import_benchmark("classifier_gap")
    import torch
    import torch.nn.functional as F

    from attnmaps.models.vit import ClassTokenViT

    torch.manual_seed(0)
    model = ClassTokenViT(num_classes=3, img_size=(16, 16), patch_size=4, embed_dim=16, depth=2,
                          num_heads=2, head="per_token", patch_head=True).eval()
    images = torch.randn(6, 3, 16, 16)
    labels = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 1, 0], [0, 0, 1], [1, 0, 1], [0, 1, 0]],
                          dtype=torch.float32)
    dataset = [{"image": x, "labels": y} for x, y in zip(images, labels, strict=True)]
    scores = classifier_gap.classifier_scores(model, dataset, [1.0], batch_size=4)
    with torch.no_grad():
        tokens = model(images)  # the plain forward pass: no patch outputs
        out = model.forward_features(images)
        patch = model.patch_head(out["patch"]).amax(1)
    mean_prob = (tokens.sigmoid() + patch.sigmoid()) / 2
    expected = {"class tokens": F.binary_cross_entropy_with_logits(tokens, labels),
                "patch head": F.binary_cross_entropy_with_logits(patch, labels),
                "ensemble": F.binary_cross_entropy(mean_prob, labels)}
    for head, bce in expected.items():
        for read_out in ("1 scale", "1 scales"):
            assert abs(scores[f"{head}, {read_out}"]["bce"] - bce.item()) < 1e-5
            assert 0.0 <= scores[f"{head}, {read_out}"]["map"] <= 1.0


def test_self_training_targets_scores_match_the_evaluator(tmp_path: Path) -> None:
    self_training_targets = import_benchmark("self_training_targets")
    from dataclasses import replace

    from attnmaps.data.registry import build_dataset
    from attnmaps.engine.evaluate import eval_options, evaluate
    from attnmaps.pipeline import load_run

    run = tiny_trained_run(tmp_path)
    result = self_training_targets.target_scores(run, "val", 6, [(0, 8), (3, 4)], batch_size=4)
    cfg, model = load_run(run)
    dataset = torch.utils.data.Subset(build_dataset(cfg.data, "val", train=False), range(6))
    for maps in ("attention", "fused"):
        settings = replace(cfg.pseudo, refine_iterations=0, tta_scales=[1.0], maps=maps)
        expected = evaluate(model, dataset, settings, **eval_options(cfg))["miou_true_labels"]
        assert result["miou_true_labels"][maps] == pytest.approx(expected, abs=1e-6)
    assert set(result["miou_true_labels"]) == {"attention", "fused", "targets 0:8",
                                               "targets 3:4"}
    assert result["cross_entropy"] >= result["target_entropy"] > 0  # Gibbs' inequality


def test_small_data_passes_sigterm_on_to_its_workers() -> None:
    import multiprocessing
    import os
    import signal
    import time

    small_data = import_benchmark("small_data")
    before = signal.getsignal(signal.SIGTERM)
    worker = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(60,))
    with pytest.raises(SystemExit) as stopped, small_data.stop_workers_on_sigterm():
        worker.start()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
    worker.join(10)
    assert stopped.value.code == 128 + signal.SIGTERM and worker.exitcode == -signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_class_maps_side_by_side_draws_the_masks_it_scores(tmp_path: Path) -> None:
    side_by_side = import_benchmark("class_maps_side_by_side")
    import numpy as np

    run = tiny_trained_run(tmp_path)
    read = side_by_side.raw_read_out(run, "val", 5, maps="attention")
    dataset = read["dataset"]
    truth = np.stack([dataset[i]["mask"].numpy() for i in range(5)])
    masks = np.stack(read["masks"])
    valid = truth != 255
    ious = []
    for label in range(dataset.num_classes + 1):
        hit, true = masks[valid] == label, truth[valid] == label
        if true.any():
            ious.append((hit & true).sum() / (hit | true).sum())
    assert read["scores"]["raw_miou_true_labels"] == pytest.approx(np.mean(ious), abs=1e-6)
    maps = np.stack(read["maps"])
    assert maps.shape == (5, dataset.num_classes, 32, 32)
    assert np.allclose(maps.max((2, 3)), 1.0) and np.allclose(maps.min((2, 3)), 0.0)
    out = tmp_path / "grid.png"
    report = side_by_side.side_by_side({"a": run, "b": run}, "val", 2, out, {"b": "attention"})
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert json.loads(out.with_suffix(".json").read_text()) == report
    assert [report["runs"][name]["read_out"] for name in "ab"] == ["fused", "attention"]
    with pytest.raises(ValueError, match=r"--maps names \['c'\]"):
        side_by_side.side_by_side({"a": run}, "val", 2, out, {"c": "fused"})
