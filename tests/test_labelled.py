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


def test_a_named_labelled_subset_replaces_the_pick_and_keeps_the_hold_out(tmp_path):
    """data.labelled_indices: the images a file names (a list, or a run's record) are the labelled subset, not
    class-balanced, in any order; the validation hold-out is the seed's as before; an index inside it, an unknown
    one, a count that differs from num_labelled or a file that is not a list of integers is one error naming it."""
    import json

    seeded = make_split(LABELS, num_labelled=100, num_classes=10, val_size=1000, seed=0)
    mine = seeded.train[[7, 3, 3000, 42, 11]].tolist()  # five images, duplicates and order do not matter
    as_list, as_record = tmp_path / "list.json", tmp_path / "labelled_indices.json"
    as_list.write_text(json.dumps(mine + mine[:1]))
    as_record.write_text(json.dumps({"labelled_indices": mine, "seed": 0}))
    for path in (as_list, as_record):
        named = make_split(LABELS, num_labelled=5, num_classes=10, val_size=1000, seed=0, labelled_indices=str(path))
        assert named.labelled.tolist() == sorted(mine)
        assert torch.equal(named.val, seeded.val) and torch.equal(named.train, seeded.train)
    bad = {
        "in_val.json": ([int(seeded.val[0])], 1, "not training images outside the validation hold-out"),
        "unknown.json": ([6000], 1, "not training images outside the validation hold-out"),
        "count.json": (mine, 10, "data.num_labelled=10, but"),
        "words.json": (["a", "b"], 2, "holds no list of integer indices"),
    }
    for name, (content, count, message) in bad.items():
        (tmp_path / name).write_text(json.dumps(content))
        with pytest.raises(ConfigError, match=message) as err:
            make_split(LABELS, count, 10, 1000, 0, labelled_indices=str(tmp_path / name))
        assert "labelled_indices" in str(err.value) or "num_labelled" in str(err.value)
