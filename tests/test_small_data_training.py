"""The small-data levers inside training: every key on at once trains, resumes exactly, and the
checkpoint holds the averaged weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attnmaps.config import load_config
from attnmaps.data.synthetic import write_synthetic_voc
from attnmaps.engine.train import train

LEVERS = ["train.prior_bias=true", "train.ema_decay=0.9", "train.mix=cutmix", "train.mix_prob=1",
          "train.gate_lr_scale=10", "model.gate_init=1.0"]
TINY = ["model.img_size=16,16", "model.patch_size=8", "model.embed_dim=16", "model.depth=1",
        "model.num_heads=2", "train.batch_size=4", "train.epochs=2", "train.log_every=1",
        "train.warmup_epochs=0.5", "train.device=cpu"]


class Interrupt(Exception):
    pass


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_levers_train_and_resume_exactly(tmp_path: Path) -> None:
    data = write_synthetic_voc(tmp_path / "data", num_train=8, num_val=4, size=(16, 16))

    def cfg(out: str):
        return load_config(None, [*TINY, *LEVERS, f"data.root={data}", f"out_dir={tmp_path / out}"])

    train(cfg("straight"))

    def stop(epoch: int, metrics: dict) -> None:
        raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg("broken"), on_epoch=stop)
    train(cfg("broken"), resume=True)
    expected, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "broken")
    assert set(expected) == set(resumed)
    for step, loss in expected.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
    averaged = load_file(tmp_path / "straight" / "last.safetensors")
    raw = torch.load(tmp_path / "straight" / "last.state.pt", weights_only=True)["raw_weights"]
    assert not torch.equal(averaged["pos_embed"], raw["pos_embed"])  # the EMA is what is saved
    gates = [v for k, v in averaged.items() if k.endswith("log_alpha")]
    assert gates and all((g < 1.0).all() for g in gates)  # gate_init=1 then pushed down
