import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from attnmaps import checkpoint as ckpt
from attnmaps.checkpoint import (
    capture_rng_state,
    checkpoint_paths,
    load_checkpoint,
    load_weights,
    restore_rng_state,
    save_checkpoint,
)
from attnmaps.errors import CheckpointError


class Tiny(nn.Module):
    def __init__(self, tied: bool = False):
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.norm = nn.LayerNorm(3)
        self.out = nn.Linear(3, 5, bias=False)
        self.register_buffer("scale", torch.ones(3))
        if tied:
            self.out.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.embed(x)) * self.scale)


def _train_steps(model: nn.Module, opt: torch.optim.Optimizer, n: int) -> None:
    for _ in range(n):
        loss = model(torch.tensor([0, 1, 2, 3])).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)


def test_round_trip_model_optimizer_and_rng(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    _train_steps(model, opt, 2)
    with torch.no_grad():
        model.scale.mul_(2)  # buffers are saved too
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    rng = capture_rng_state()
    expected_draws = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    save_checkpoint(tmp_path, model, {"optimizer": opt.state_dict(), "epoch": 4, "step": 9,
                                      "rng": rng})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.safetensors", "last.state.pt"]

    torch.manual_seed(99)
    restored = Tiny()
    restored_opt = torch.optim.AdamW(restored.parameters(), lr=0.1)
    state = load_checkpoint(tmp_path, restored)
    _assert_same_weights(model, restored)
    assert state["epoch"] == 4 and state["step"] == 9
    assert set(state) == {"optimizer", "epoch", "step", "rng"}
    restored_opt.load_state_dict(state["optimizer"])
    # identical optimizer state => identical next update
    _train_steps(model, opt, 1)
    _train_steps(restored, restored_opt, 1)
    _assert_same_weights(model, restored)

    random.random(), np.random.rand(5), torch.rand(7)  # move all generators on
    restore_rng_state(state["rng"])
    assert random.random() == expected_draws[0]
    assert np.random.rand(3).tolist() == expected_draws[1]
    torch.testing.assert_close(torch.rand(3), expected_draws[2], rtol=0, atol=0)


def test_rng_state_is_plain_data():
    state = capture_rng_state()
    assert isinstance(state["torch"], torch.Tensor)
    assert isinstance(state["python"], list) and isinstance(state["python"][1], list)
    assert isinstance(state["numpy"][1], list) and all(type(k) is int for k in state["numpy"][1])


def test_tags_are_separate(tmp_path):
    a, b = Tiny(), Tiny()
    save_checkpoint(tmp_path, a, {"epoch": 1}, tag="best")
    save_checkpoint(tmp_path, b, {"epoch": 2})
    target = Tiny()
    assert load_checkpoint(tmp_path, target, tag="best")["epoch"] == 1
    _assert_same_weights(a, target)
    assert load_checkpoint(tmp_path, target)["epoch"] == 2
    _assert_same_weights(b, target)


def test_tied_weights_saved_once_and_restored(tmp_path):
    torch.manual_seed(0)
    model = Tiny(tied=True)
    save_checkpoint(tmp_path, model, {})
    target = Tiny(tied=True)
    load_checkpoint(tmp_path, target)
    _assert_same_weights(model, target)
    assert target.out.weight is target.embed.weight


def test_non_contiguous_tensors(tmp_path):
    model = Tiny()
    with torch.no_grad():
        model.out.weight = nn.Parameter(torch.randn(3, 5).t())
    assert not model.out.weight.is_contiguous()
    save_checkpoint(tmp_path, model, {})
    target = Tiny()
    load_checkpoint(tmp_path, target)
    _assert_same_weights(model, target)


def test_load_weights_bare_file(tmp_path):
    model = Tiny()
    save_checkpoint(tmp_path, model, {}, tag="w")
    target = Tiny()
    load_weights(tmp_path / "w.safetensors", target)
    _assert_same_weights(model, target)


def test_mismatched_model_is_rejected_and_left_untouched(tmp_path):
    save_checkpoint(tmp_path, Tiny(), {})

    class Other(Tiny):
        def __init__(self):
            super().__init__()
            self.extra = nn.Linear(2, 2)
            del self.norm

    other = Other()
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"missing keys: extra\.bias, extra\.weight; "
                                         r"unexpected keys: norm\.bias, norm\.weight"):
        load_checkpoint(tmp_path, other)
    for k, v in other.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)

    wide = Tiny()
    wide.out = nn.Linear(3, 6, bias=False)
    with pytest.raises(ValueError, match=r"shape mismatches \(file vs model\): "
                                         r"out\.weight \(5, 3\) vs \(6, 3\)"):
        load_checkpoint(tmp_path, wide)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"last\.safetensors"):
        load_checkpoint(tmp_path, Tiny())
    save_checkpoint(tmp_path, Tiny(), {})
    (tmp_path / "last.state.pt").unlink()
    with pytest.raises(CheckpointError, match=r"last\.state\.pt"):
        load_checkpoint(tmp_path, Tiny())
    with pytest.raises(FileNotFoundError, match=r"nothing\.safetensors"):
        load_weights(tmp_path / "nothing.safetensors", Tiny())


def test_bad_tag_and_reserved_key(tmp_path):
    with pytest.raises(ValueError, match=r"tag '\.\./x'"):
        checkpoint_paths(tmp_path, "../x")
    with pytest.raises(ValueError, match="reserved key 'checkpoint_id'"):
        save_checkpoint(tmp_path, Tiny(), {"checkpoint_id": 1})


@pytest.mark.parametrize("fail_at", ["torch.save", "first os.replace", "safetensors"])
def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch, fail_at):
    torch.manual_seed(0)
    good = Tiny()
    save_checkpoint(tmp_path, good, {"epoch": 1})
    good_files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def boom(*args, **kwargs):
        raise OSError("disk full")

    if fail_at == "torch.save":
        monkeypatch.setattr(torch, "save", boom)
    elif fail_at == "safetensors":
        monkeypatch.setattr(ckpt, "save_model", boom)
    else:
        monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, Tiny(), {"epoch": 2})
    monkeypatch.undo()

    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == good_files  # no temp left
    target = Tiny()
    assert load_checkpoint(tmp_path, target)["epoch"] == 1
    _assert_same_weights(good, target)


@pytest.mark.parametrize("moves_done", [0, 1, 2, 3])
def test_a_save_killed_between_moves_loses_at_most_that_save(tmp_path, monkeypatch, moves_done):
    """A save moves 4 files (the current pair to .prev, the new pair into place); killed after
    any of them, loading gives the last complete checkpoint (epoch 2), never a torn pair."""
    save_checkpoint(tmp_path, Tiny(), {"epoch": 1})
    save_checkpoint(tmp_path, Tiny(), {"epoch": 2})
    real_replace = os.replace
    calls = []

    def replace_some(src, dst):
        calls.append(dst)
        if len(calls) > moves_done:
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_some)
    with pytest.raises(OSError, match="power cut"):
        save_checkpoint(tmp_path, Tiny(), {"epoch": 3})
    monkeypatch.undo()
    assert not list(tmp_path.glob("*.tmp"))
    if moves_done:
        with pytest.warns(UserWarning, match="newest complete checkpoint"):
            assert load_checkpoint(tmp_path, Tiny())["epoch"] == 2
    else:
        assert load_checkpoint(tmp_path, Tiny())["epoch"] == 2


def test_damaged_checkpoint_falls_back_and_names_the_file(tmp_path):
    save_checkpoint(tmp_path, Tiny(), {"epoch": 1})
    save_checkpoint(tmp_path, Tiny(), {"epoch": 2})
    (tmp_path / "last.safetensors").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match=r"last\.safetensors is damaged"):
        assert load_checkpoint(tmp_path, Tiny())["epoch"] == 1
    (tmp_path / "last.prev.state.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"last\.prev\.state\.pt is damaged"):
        load_checkpoint(tmp_path, Tiny())


def test_stale_temporary_files_are_removed_by_the_next_save(tmp_path):
    stale = tmp_path / ".last.safetensors.0123abcd.tmp"
    stale.write_bytes(b"x" * 100)
    save_checkpoint(tmp_path, Tiny(), {"epoch": 1})
    assert not stale.exists()
