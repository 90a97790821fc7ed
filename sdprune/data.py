"""Data sets by name, class-balanced subsets, transforms and loaders.

Every command that reads images goes through `load_data`, so the data options
mean the same thing everywhere: `cifar10`, `cifar100` and `svhn` through
torchvision, `imagefolder` for a folder with `train/` and `test/` (or `val/`),
and `digits`, scikit-learn's bundled 8x8 handwritten digits, which needs no
download.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision import datasets, transforms

from sdprune.errors import DataError, InvalidValueError

logger = logging.getLogger(__name__)

DATASETS = ("digits", "imagefolder", "cifar10", "cifar100", "svhn")

# Per-channel statistics of the training images, as commonly published for each set.
KNOWN_STATISTICS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}

# The digits split is fixed so that every command and every run sees the same test images.
DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0

# Images used to estimate mean and std of an image folder: enough for three decimals.
STATISTICS_SAMPLE = 2000

# Seeds of the class-balanced selections; fixed so a subset means the same images everywhere.
SUBSET_SEED = 0
VALIDATION_SEED = 1


@dataclass(frozen=True)
class DataConfig:
    """What to read and how much of it."""

    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    limit_train: int | None = None
    limit_test: int | None = None
    val_split: int = 0
    batch_size: int = 128
    workers: int | None = None

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise InvalidValueError(
                f"unknown data set {self.dataset!r}: use one of {', '.join(DATASETS)}"
            )
        if self.dataset != "digits" and not self.data_dir:
            raise InvalidValueError(
                f"--data-dir is required for --dataset {self.dataset}"
            )
        for name in ("limit_train", "limit_test"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InvalidValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.val_split < 0:
            raise InvalidValueError(f"--val-split must be 0 or more, got {self.val_split}")
        if self.batch_size < 1:
            raise InvalidValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 0:
            raise InvalidValueError(f"--workers must be 0 or more, got {self.workers}")


@dataclass
class DataBundle:
    """The splits of one data set plus what a model needs to preprocess it.

    `train` applies the training augmentation; `train_plain` holds the same
    images with the evaluation transform; `val` is None without a validation split.
    """

    train: Dataset
    train_plain: Dataset
    val: Dataset | None
    test: Dataset
    classes: list[str]
    mean: list[float]
    std: list[float]
    input_shape: list[int]
    augment: bool
    config: DataConfig = field(repr=False, default_factory=DataConfig)

    def loader(self, split: str, shuffle: bool = False, batch_size: int | None = None,
               generator: torch.Generator | None = None, sampler=None,
               pin_memory: bool = False) -> DataLoader:
        """Return a DataLoader over `split` (train, train_plain, val or test)."""
        dataset = getattr(self, split)
        if dataset is None:
            raise InvalidValueError(f"the data has no {split} split")
        workers = self.config.workers
        if workers is None:
            # Tensor-backed digits gain nothing from worker processes; decoding JPEGs does.
            workers = 0 if self.config.dataset == "digits" else min(4, os.cpu_count() or 1)
        return DataLoader(
            dataset,
            batch_size=batch_size or self.config.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            num_workers=workers,
            generator=generator,
            pin_memory=pin_memory,
            persistent_workers=workers > 0 and split == "train",
            drop_last=False,
        )


def balanced_indices(
    targets: Sequence[int], limit: int | None, seed: int, exclude: set[int] | None = None
) -> list[int]:
    """Pick up to `limit` indices with the classes as equal as possible.

    Deterministic for a seed: each class's indices are shuffled once, then taken
    in turn class by class, so a smaller limit selects a subset of a larger one.
    Returns every index not in `exclude` when `limit` is None.
    """
    exclude = exclude or set()
    available = [index for index in range(len(targets)) if index not in exclude]
    if limit is None or limit >= len(available):
        return available

    by_class: dict[int, list[int]] = {}
    for index in available:
        by_class.setdefault(int(targets[index]), []).append(index)
    generator = torch.Generator().manual_seed(seed)
    queues = []
    for label in sorted(by_class):
        members = by_class[label]
        order = torch.randperm(len(members), generator=generator).tolist()
        queues.append([members[position] for position in order])

    chosen: list[int] = []
    depth = 0
    while len(chosen) < limit:
        for queue in queues:
            if depth < len(queue) and len(chosen) < limit:
                chosen.append(queue[depth])
        depth += 1
    return sorted(chosen)


def _targets(dataset: Dataset) -> list[int]:
    if hasattr(dataset, "targets"):
        return [int(label) for label in dataset.targets]
    if hasattr(dataset, "labels"):
        return [int(label) for label in dataset.labels]
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].tolist()
    raise TypeError(f"cannot read labels of {type(dataset).__name__}")


def _image_transforms(
    size: Sequence[int], mean: Sequence[float], std: Sequence[float], augment: bool,
    flip: bool, resize: bool,
) -> tuple[transforms.Compose, transforms.Compose]:
    common = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    plain = ([transforms.Resize(tuple(size))] if resize else []) + common
    if not augment:
        return transforms.Compose(plain), transforms.Compose(plain)
    # The CIFAR augmentation of He et al. 2016: 4-pixel zero padding, random crop, flip.
    training = [transforms.Resize(tuple(size))] if resize else []
    training.append(transforms.RandomCrop(tuple(size), padding=4))
    if flip:
        training.append(transforms.RandomHorizontalFlip())
    return transforms.Compose(training + common), transforms.Compose(plain)


def _load_digits() -> tuple[Dataset, Dataset, list[str], list[float], list[float]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Pixel values run from 0 to 16.
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_index, test_index = train_test_split(
        list(range(len(labels))),
        test_size=DIGITS_TEST_FRACTION,
        random_state=DIGITS_SPLIT_SEED,
        stratify=digits.target,
    )
    train_images = images[train_index]
    mean = [float(train_images.mean())]
    std = [float(train_images.std())]
    normalize = lambda batch: (batch - mean[0]) / std[0]  # noqa: E731
    train = TensorDataset(normalize(train_images), labels[train_index])
    test = TensorDataset(normalize(images[test_index]), labels[test_index])
    classes = [str(name) for name in digits.target_names]
    return train, test, classes, mean, std


def _image_folder_statistics(folder: datasets.ImageFolder) -> tuple[list[float], list[float], list[int]]:
    """Estimate per-channel mean and std from a class-balanced sample of images."""
    indices = balanced_indices(folder.targets, STATISTICS_SAMPLE, SUBSET_SEED)
    first = transforms.functional.to_tensor(folder.loader(folder.samples[indices[0]][0]))
    size = list(first.shape[1:])
    to_tensor = transforms.Compose([transforms.Resize(tuple(size)), transforms.ToTensor()])
    total = torch.zeros(first.shape[0], dtype=torch.float64)
    total_squares = torch.zeros_like(total)
    pixels = 0
    for index in indices:
        image = to_tensor(folder.loader(folder.samples[index][0])).double()
        if image.shape[0] != first.shape[0]:
            raise DataError(
                f"{folder.samples[index][0]} has {image.shape[0]} channels, "
                f"others have {first.shape[0]}: convert the images to one mode"
            )
        total += image.sum(dim=(1, 2))
        total_squares += (image**2).sum(dim=(1, 2))
        pixels += image.shape[1] * image.shape[2]
    mean = total / pixels
    std = (total_squares / pixels - mean**2).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist(), [first.shape[0], *size]


def _open_image_folder(path: Path, transform=None) -> datasets.ImageFolder:
    try:
        return datasets.ImageFolder(str(path), transform=transform)
    except (FileNotFoundError, OSError) as error:
        raise DataError(f"cannot read image folder {path}: {error}") from error


def _load_image_folder(config: DataConfig):
    root = Path(config.data_dir).expanduser()
    if not root.is_dir():
        raise InvalidValueError(f"--data-dir {root} is not a folder: point it at a folder with train/ and test/")
    train_root = root / "train"
    test_root = next((root / name for name in ("test", "val") if (root / name).is_dir()), None)
    if not train_root.is_dir() or test_root is None:
        raise InvalidValueError(
            f"--data-dir {root} must contain train/ and test/ (or val/) folders of class subfolders"
        )
    train_folder = _open_image_folder(train_root)
    mean, std, shape = _image_folder_statistics(train_folder)
    return train_folder, test_root, mean, std, shape


def _torchvision_set(name: str, root: str, train: bool, transform, download: bool) -> Dataset:
    try:
        if name == "svhn":
            return datasets.SVHN(root, split="train" if train else "test", transform=transform, download=download)
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        return cls(root, train=train, transform=transform, download=download)
    except RuntimeError as error:
        raise DataError(
            f"{name} files not found or corrupt under {Path(root).resolve()}: "
            "put the torchvision files there or add --download"
        ) from error
    except OSError as error:
        raise DataError(f"cannot download or read {name} under {root}: {error}") from error


def _split(train_full: Dataset, train_plain_full: Dataset, test_full: Dataset,
           config: DataConfig) -> tuple[Dataset, Dataset, Dataset | None, Dataset]:
    targets = _targets(train_full)
    if config.val_split >= len(targets):
        raise InvalidValueError(
            f"--val-split {config.val_split} leaves no training images (the set has {len(targets)})"
        )
    val_indices = balanced_indices(targets, config.val_split, VALIDATION_SEED) if config.val_split else []
    train_indices = balanced_indices(targets, config.limit_train, SUBSET_SEED, exclude=set(val_indices))
    test_indices = balanced_indices(_targets(test_full), config.limit_test, SUBSET_SEED)
    val = Subset(train_plain_full, val_indices) if val_indices else None
    return (
        Subset(train_full, train_indices),
        Subset(train_plain_full, train_indices),
        val,
        Subset(test_full, test_indices),
    )


def load_data(config: DataConfig) -> DataBundle:
    """Open a data set and return its splits and preprocessing metadata.

    Raises InvalidValueError for a wrong name or folder and DataError when the
    files are missing or unreadable.
    """
    if config.dataset == "digits":
        train_full, test_full, classes, mean, std = _load_digits()
        train, train_plain, val, test = _split(train_full, train_full, test_full, config)
        return DataBundle(train, train_plain, val, test, classes, mean, std,
                          [1, 8, 8], augment=False, config=config)

    if config.dataset == "imagefolder":
        train_full, test_root, mean, std, shape = _load_image_folder(config)
        classes = train_full.classes
        training, plain = _image_transforms(shape[1:], mean, std, augment=True, flip=True, resize=True)
        # Scanning 50,000 files takes seconds, so the plain view shares the scanned file list.
        train_plain_full = copy.copy(train_full)
        train_full.transform, train_plain_full.transform = training, plain
        test_full = _open_image_folder(test_root, plain)
        if test_full.classes != classes:
            raise DataError(
                f"{test_root} has classes {test_full.classes}, but {train_full.root} has {classes}: "
                "both need the same class folders"
            )
        train, train_plain, val, test = _split(train_full, train_plain_full, test_full, config)
        return DataBundle(train, train_plain, val, test, list(classes), mean, std, shape,
                          augment=True, config=config)

    root = str(Path(config.data_dir).expanduser())
    mean, std = (list(values) for values in KNOWN_STATISTICS[config.dataset])
    # Flipping changes a digit's meaning, so SVHN gets the crop only.
    training, plain = _image_transforms(
        (32, 32), mean, std, augment=True, flip=config.dataset != "svhn", resize=False
    )
    train_full = _torchvision_set(config.dataset, root, True, training, config.download)
    train_plain_full = _torchvision_set(config.dataset, root, True, plain, False)
    test_full = _torchvision_set(config.dataset, root, False, plain, config.download)
    if config.dataset == "svhn":
        classes = [str(digit) for digit in range(10)]
    else:
        classes = list(train_full.classes)
    train, train_plain, val, test = _split(train_full, train_plain_full, test_full, config)
    return DataBundle(train, train_plain, val, test, classes, mean, std, [3, 32, 32],
                      augment=True, config=config)
