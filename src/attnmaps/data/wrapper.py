"""A dataset that wraps another and answers for it: its length and any attribute it lacks."""

from __future__ import annotations

from torch.utils.data import Dataset


class DatasetWrapper(Dataset):
    """Base of the datasets that change the items of ``dataset``: ``len`` and every attribute
    the wrapper does not set itself (``class_names``, ``augment``, ...) are ``dataset``'s, so
    code that reads them works on the wrapped set too."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        if name == "dataset":  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)
