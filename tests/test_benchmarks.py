"""The speed and memory benchmarks run (their --quick modes, tiny shapes) and write JSON whose
deterministic parts hold: byte counts and label agreement, never a timing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = ["--img-size", "32", "--embed-dim", "32", "--depth", "2", "--heads", "2"]


def run_benchmark(script: str, args: list[str], tmp_path: Path) -> dict:
    out = tmp_path / f"{script}.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / f"{script}.py"), "--quick", *args,
                           "--out", str(out)], check=False, capture_output=True, text=True,
                           timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())


def test_train_step_keeps_less_for_backward_than_the_reference(tmp_path: Path) -> None:
    result = run_benchmark("train_step", TINY, tmp_path)
    saved = result["saved_for_backward_bytes"]
    assert saved["attnmaps"] < saved["reference"]
    assert result["throughput_ratio"] > 0 and len(result["step_seconds"]["attnmaps"]) == 5


def test_attention_kernel_covers_both_dtypes_and_modes(tmp_path: Path) -> None:
    results = run_benchmark("attention_kernel", [], tmp_path)["results"]
    assert {(r["dtype"], r["mode"]) for r in results} == {
        (dtype, mode) for dtype in ("fp32", "bf16") for mode in ("train", "eval")}
    assert {r["dtype"]: r["auto"] for r in results} == {"fp32": "fused", "bf16": "explicit"}


def test_pseudo_mask_speed_agrees_with_the_reference_on_claimed_pixels(tmp_path: Path) -> None:
    agreement = run_benchmark("pseudo_mask_speed", [], tmp_path)["agreement"]
    assert agreement["claimed_pixels"] == 1.0 and agreement["filled_pixels"] > 0.99


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
    if "pydensecrf" in result["seconds_per_image"]:
        assert result["synthetic_pixels_agree"] >= 0.95


@pytest.mark.slow
def test_small_data_quick_scores_raw_and_refined_maps(tmp_path: Path) -> None:
    pytest.importorskip("mlxtend")
    done = subprocess.run([sys.executable, str(BENCHMARKS / "small_data.py"), "--quick",
                           "--out", str(tmp_path)], check=False, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "small_data_tune.json").read_text())
    assert 0.0 <= report["floor_miou"] <= 1.0
    assert set(report["summary"]) == {"recipe", "no prior bias"}
    for row in report["summary"].values():
        for key in ("map", "raw_miou", "raw_miou_true_labels", "miou", "miou_true_labels"):
            assert 0.0 <= row[key][0] <= 1.0
        assert row["train_cpu_seconds"][0] > 0
