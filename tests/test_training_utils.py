"""mpvit.training: the pieces every driver relies on for one-line errors."""
from __future__ import annotations

import pytest
from torch.utils.data import DataLoader, Dataset

from mpvit.training import ensure_writable_dir, error_line


class _BadLabel(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        raise ValueError(f'label /data/{index}.png holds values 200 outside the 150 classes')


def test_error_raised_in_a_worker_is_one_line():
    with pytest.raises(ValueError) as info:
        next(iter(DataLoader(_BadLabel(), num_workers=1)))
    assert len(str(info.value).splitlines()) > 1  # PyTorch wraps the worker's traceback into the message
    assert error_line(info.value) == 'label /data/0.png holds values 200 outside the 150 classes'
    assert error_line(ValueError('plain')) == 'plain'


def test_output_directory_is_created_or_refused(tmp_path):
    assert ensure_writable_dir(tmp_path / 'a' / 'b').is_dir()
    assert not list((tmp_path / 'a' / 'b').iterdir())  # the probe file is gone
    (tmp_path / 'file').write_text('')
    with pytest.raises(ValueError, match=f'output directory {tmp_path / "file" / "out"} cannot be created'):
        ensure_writable_dir(tmp_path / 'file' / 'out')
