"""Data sets by name and class-balanced subsets."""

from collections import Counter

import pytest

from sdprune.data import DataConfig, balanced_indices, load_data
from sdprune.errors import DataError, InvalidValueError


def test_balanced_indices_equal_classes():
    targets = [label for label in range(4) for _ in range(25)]
    chosen = balanced_indices(targets, 20, seed=0)
    assert len(chosen) == 20
    assert Counter(targets[index] for index in chosen) == {0: 5, 1: 5, 2: 5, 3: 5}


def test_balanced_indices_deterministic_and_nested():
    targets = [index % 3 for index in range(90)]
    assert balanced_indices(targets, 30, seed=0) == balanced_indices(targets, 30, seed=0)
    assert set(balanced_indices(targets, 12, seed=0)) <= set(balanced_indices(targets, 30, seed=0))


def test_balanced_indices_exclude():
    targets = [index % 2 for index in range(40)]
    held_out = set(balanced_indices(targets, 10, seed=1))
    rest = balanced_indices(targets, None, seed=0, exclude=held_out)
    assert not held_out & set(rest)
    assert len(rest) == 30


def test_digits_split_and_metadata():
    bundle = load_data(DataConfig(dataset="digits", limit_train=100, val_split=50))
    assert bundle.input_shape == [1, 8, 8]
    assert bundle.classes == [str(digit) for digit in range(10)]
    assert len(bundle.train) == 100
    assert len(bundle.val) == 50
    assert len(bundle.test) == 450
    image, label = bundle.test[0]
    assert image.shape == (1, 8, 8)
    assert 0 <= label < 10


def test_imagefolder_subset(cifar10_jpg):
    bundle = load_data(DataConfig(dataset="imagefolder", data_dir=str(cifar10_jpg), limit_train=40, limit_test=20))
    assert bundle.classes[:3] == ["airplane", "automobile", "bird"]
    assert bundle.input_shape == [3, 32, 32]
    assert len(bundle.train) == 40 and len(bundle.test) == 20
    labels = Counter(label for _, label in bundle.test)
    assert set(labels.values()) == {2}
    assert all(0.1 < value < 0.4 for value in bundle.std)


def test_imagefolder_without_test_folder(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(InvalidValueError, match="must contain train/ and test/"):
        load_data(DataConfig(dataset="imagefolder", data_dir=str(tmp_path)))


def test_cifar10_missing_files_names_folder(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path)):
        load_data(DataConfig(dataset="cifar10", data_dir=str(tmp_path)))


def test_data_dir_required():
    with pytest.raises(InvalidValueError, match="--data-dir is required"):
        DataConfig(dataset="imagefolder")
