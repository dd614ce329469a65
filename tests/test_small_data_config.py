"""Bad values of the small-data config keys are rejected with the key and the value named."""

from __future__ import annotations

import pytest

from attnmaps.config import load_config


@pytest.mark.parametrize(("override", "message"), [
    ("train.ema_decay=1.0", r"'train\.ema_decay' is 1\.0"),
    ("train.mix=mosaic", r"'train\.mix': got 'mosaic'"),
    ("train.mix_alpha=0", r"'train\.mix_alpha'=0\.0"),
    ("train.mix_prob=2", r"'train\.mix_prob'=2\.0"),
    ("train.gate_lr_scale=0", r"'train\.gate_lr_scale' is 0\.0"),
    ("pretrain.mask_ratio=1.0", r"'pretrain\.mask_ratio' is 1\.0"),
    ("model.gate_init=open", r"'model\.gate_init': got 'open'"),
])
def test_bad_values_name_key_and_value(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_defaults_keep_the_previous_behaviour() -> None:
    cfg = load_config(None, [])
    assert (cfg.train.prior_bias, cfg.train.ema_decay, cfg.train.mix, cfg.train.gate_lr_scale,
            cfg.model.gate_init) == (False, 0.0, "none", 1.0, None)
