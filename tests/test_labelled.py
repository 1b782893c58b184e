"""The class-balanced labelled subset and the validation split (ssvae_pl/data/labelled.py)."""

import pytest
import torch

from ssvae_pl.data.labelled import make_split
from ssvae_pl.errors import ConfigError

LABELS = torch.arange(10).repeat_interleave(600)[torch.randperm(6000, generator=torch.Generator().manual_seed(1))]


def test_subset_is_balanced_deterministic_and_seed_dependent():
    a = make_split(LABELS, num_labelled=100, num_classes=10, val_size=1000, seed=0)
    b = make_split(LABELS, num_labelled=100, num_classes=10, val_size=1000, seed=0)
    c = make_split(LABELS, num_labelled=100, num_classes=10, val_size=1000, seed=1)
    assert torch.equal(a.labelled, b.labelled) and torch.equal(a.val, b.val)
    assert not torch.equal(a.labelled, c.labelled)
    assert torch.bincount(LABELS[a.labelled], minlength=10).tolist() == [10] * 10
    assert len(a.labelled.unique()) == 100


def test_split_is_a_partition_and_labelled_images_are_not_validation_images():
    s = make_split(LABELS, num_labelled=50, num_classes=10, val_size=1000, seed=3)
    assert len(s.val) == 1000 and len(s.train) == 5000
    assert not torch.isin(s.val, s.train).any()
    assert torch.isin(s.labelled, s.train).all()


@pytest.mark.parametrize(
    "num_labelled, message",
    [(0, "must be positive"), (-10, "must be positive"), (105, "not a multiple"), (6000, "holds only")],
)
def test_bad_label_budgets_name_the_field(num_labelled, message):
    with pytest.raises(ConfigError, match=message) as err:
        make_split(LABELS, num_labelled=num_labelled, num_classes=10, val_size=1000, seed=0)
    assert "data.num_labelled" in str(err.value)
