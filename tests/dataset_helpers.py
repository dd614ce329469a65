"""Helpers shared by the dataset tests."""

from __future__ import annotations

import pytest
import torch


def assert_labels_read_without(dataset, monkeypatch: pytest.MonkeyPatch,
                               methods: tuple[str, ...]) -> None:
    """``dataset.image_labels(i)`` equals the labels of ``dataset[i]`` for every item, with
    each of ``methods`` of the dataset's class failing the test when called."""
    expected = [dataset[i]["labels"] for i in range(len(dataset))]
    for method in methods:
        monkeypatch.setattr(type(dataset), method, lambda *_, name=method: pytest.fail(name))
    assert all(torch.equal(dataset.image_labels(i), labels) for i, labels in enumerate(expected))
