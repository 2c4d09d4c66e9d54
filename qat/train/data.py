"""Datasets and loaders: torchvision datasets, ImageFolder trees, a validation split, synthetic data.

`build_data(cfg)` returns a `DataBundle` with train / val / test datasets (val and test may be None)
and the facts the trainer needs (classes, channels, image size). Base datasets are built without
transforms and wrapped in `TransformedSubset`, so the validation split carved from the train set gets
the evaluation transform while the rest keeps the augmentation.

Where files come from:
  - `data.root` (default: env QAT_DATA, else ./data) is where torchvision looks and writes.
  - `data.source` (default: env QAT_DATA_SOURCE) is an optional read-only folder holding
    `<Dataset>/raw/*.gz` (MNIST, FashionMNIST); the raw files are copied into root when missing there,
    because torchvision unpacks next to them and the source may be read-only. Every raw file is
    checked against torchvision's published md5 (`<Dataset>.resources`) before it is copied and
    again in root: a corrupt source file is named and never copied; a corrupt copy already in root
    (e.g. left by an earlier version) is replaced from an intact source, else named (`CorruptDataError`).
  - `data.imagefolder` points at a tree `train/<class>/*` (+ optional `test/<class>/*`).
A dataset that is missing while offline raises DatasetNotFoundError naming the path and the fixes;
an image that cannot be decoded raises UnreadableImageError naming the file.

Validation split (`data.val_split`, carved from the train set with a seeded permutation): the
configs default to 5,000 images for MNIST, Fashion-MNIST, CIFAR-10/100 and 2 % for ImageFolder
trees, so best.pt is chosen on held-out training images and the test set only gives the final
figure. Synthetic data instead draws a separate validation set of `data.num_val` images (default: as
many as the test set) from the same distribution, so the tiny smoke configs keep every training image.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset

from qat.train.config import as_path

NORMALIZATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
TORCHVISION_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST",
                       "cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder", "synthetic")
AUGMENTATIONS = ("none", "crop_flip", "imagenet")


log = logging.getLogger(__name__)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing and could not be downloaded."""


class CorruptDataError(DatasetNotFoundError):
    """A dataset file whose md5 differs from torchvision's published sum (truncated or damaged)."""


class UnreadableImageError(OSError):
    """An image file that PIL cannot decode."""


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset | None
    test: Dataset | None
    num_classes: int
    channels: int
    image_size: int

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)


class TransformedSubset(Dataset):
    """`base[indices[i]]` with `transform` applied to the image (indices None = all of base)."""

    def __init__(self, base: Dataset, indices: Sequence[int] | None, transform: Callable | None):
        self.base, self.indices, self.transform = base, indices, transform

    def __len__(self) -> int:
        return len(self.base) if self.indices is None else len(self.indices)

    def __getitem__(self, index: int):
        image, label = self.base[index if self.indices is None else self.indices[index]]
        return (self.transform(image) if self.transform else image), label


class InMemoryDataset(Dataset):
    """Every (image, label) of `base` decoded once and kept in memory (for ImageFolder trees)."""

    def __init__(self, base: Dataset):
        self.items = [base[i] for i in range(len(base))]
        self.classes = getattr(base, "classes", None)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


class SyntheticImages(Dataset):
    """Deterministic random images whose class shifts a per-class mean pattern, so it is learnable.

    image_i = noise_i + 2 * pattern[label_i], noise ~ N(0, 1), label_i = i mod num_classes.
    """

    def __init__(self, size: int, num_classes: int, channels: int, image_size: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        patterns = torch.randn(num_classes, channels, image_size, image_size,
                               generator=torch.Generator().manual_seed(12345))
        self.labels = torch.arange(size) % num_classes
        noise = torch.randn(size, channels, image_size, image_size, generator=generator)
        self.images = noise + 2.0 * patterns[self.labels]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index])


def build_transforms(augment: str, mean, std, image_size: int):
    """(train_transform, eval_transform) for PIL images.

    crop_flip: RandomCrop(image_size, padding=4) + RandomHorizontalFlip (CIFAR standard);
    imagenet: RandomResizedCrop + flip for train, Resize(size*8/7) + CenterCrop for eval;
    none: only ToTensor + Normalize.
    """
    from torchvision import transforms as T

    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown data.augment {augment!r}; valid: {', '.join(AUGMENTATIONS)}")
    finish = [T.ToTensor(), T.Normalize(mean, std)]
    if augment == "imagenet":
        train = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
        evaluation = [T.Resize(int(round(image_size * 8 / 7))), T.CenterCrop(image_size)]
        return T.Compose(train + finish), T.Compose(evaluation + finish)
    evaluation = T.Compose(finish)
    if augment == "crop_flip":
        return T.Compose([T.RandomCrop(image_size, padding=4), T.RandomHorizontalFlip()] + finish), evaluation
    return evaluation, evaluation


def _offline_help(name: str, looked_in: Path, cause: BaseException | None) -> str:
    folder = TORCHVISION_FOLDERS.get(name, "")
    reason = (str(cause).strip().splitlines() or [""])[0] if cause else ""
    lines = [f"dataset {name!r} not found in {looked_in}"
             + (f" and it could not be downloaded ({type(cause).__name__}: {reason})" if cause else "")]
    if name in ("mnist", "fashion_mnist"):
        lines.append(f"provide the four torchvision .gz files in {looked_in}/raw/, or set "
                     f"data.source=<dir holding {folder}/raw/> (e.g. ../shared/data) to copy them, "
                     f"or set data.root / env QAT_DATA to a folder that has {folder}/raw/")
    elif name in ("cifar10", "cifar100"):
        lines.append(f"put torchvision's extracted {folder}/ under data.root (env QAT_DATA), or read an "
                     f"ImageFolder tree with data.imagefolder=<dir with train/<class>/ and test/<class>/>")
    else:
        lines.append("set data.imagefolder=<dir with train/<class>/ and optionally test/<class>/>")
    return "; ".join(lines)


def raw_resources(name: str) -> list[tuple[str, str]]:
    """(file name, md5) of the raw files of MNIST / FashionMNIST, as torchvision publishes them."""
    from torchvision import datasets

    return [(file, md5) for file, md5 in {"mnist": datasets.MNIST,
                                          "fashion_mnist": datasets.FashionMNIST}[name].resources]


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _unpacked(raw_file: Path) -> Path:
    """The file torchvision unpacks a raw .gz into (next to it)."""
    return raw_file.with_suffix("") if raw_file.suffix == ".gz" else raw_file


def copy_raw_files(name: str, source: Path | None, root: Path) -> None:
    """Make `<root>/<Folder>/raw/` hold intact copies of the raw files (see the module doc).

    For each of torchvision's (file, md5): a file in root with the right md5 is kept; a missing or
    corrupt one is copied from `<source>/<Folder>/raw/` after that file's md5 is checked, through a
    temporary file renamed into place, so a failed or corrupt copy never stays in root (a corrupt
    one in root is replaced, together with what torchvision unpacked from it). A corrupt file with
    no intact source raises CorruptDataError naming it; files missing everywhere are left to
    torchvision (download, or its not-found error).
    """
    folder = TORCHVISION_FOLDERS[name]
    source_raw = source / folder / "raw" if source is not None else None
    if source_raw is not None and not source_raw.is_dir():
        raise DatasetNotFoundError(f"data.source={source} has no {folder}/raw/ folder; "
                                   f"expected the torchvision .gz files in {source_raw}")
    target_raw = root / folder / "raw"
    for file, md5 in raw_resources(name):
        target = target_raw / file
        found = md5sum(target) if target.is_file() else None
        if found == md5:
            continue
        origin = source_raw / file if source_raw is not None else None
        if origin is None or not origin.is_file():
            if found is not None:
                raise CorruptDataError(
                    f"{target} is corrupt: md5 {found}, expected {md5} (torchvision's published sum); "
                    f"delete it and {_unpacked(target).name} next to it, and provide an intact copy "
                    f"(data.source=<dir holding {folder}/raw/{file}>, or a download)")
            continue
        source_md5 = md5sum(origin)
        if source_md5 != md5:
            raise CorruptDataError(
                f"data.source file {origin} is corrupt: md5 {source_md5}, expected {md5} (torchvision's "
                f"published sum); nothing was copied into {target_raw}; replace it with an intact copy")
        target_raw.mkdir(parents=True, exist_ok=True)
        temporary = target_raw / f".{file}.{os.getpid()}.partial"
        try:
            shutil.copyfile(origin, temporary)
            copied = md5sum(temporary)
            if copied != md5:
                raise CorruptDataError(f"copying {origin} to {target} gave md5 {copied}, expected {md5}; "
                                       f"check the disk holding data.root={root}")
            if found is not None:  # a corrupt copy from an earlier run: what was unpacked from it goes too
                _unpacked(target).unlink(missing_ok=True)
                log.warning("replaced corrupt %s (md5 %s) with the intact copy from %s", target, found, origin)
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)


def load_torchvision(name: str, root: Path, train: bool, download: bool) -> Dataset:
    """torchvision's MNIST / FashionMNIST / CIFAR10 / CIFAR100 split (no transform)."""
    from torchvision import datasets

    dataset_class = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST,
                     "cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    try:
        return dataset_class(str(root), train=train, download=download)
    except (RuntimeError, OSError) as error:  # urllib errors are OSErrors
        raise DatasetNotFoundError(_offline_help(name, root / TORCHVISION_FOLDERS[name],
                                                 error if download else None)) from error


def read_image(path: str):
    """torchvision's ImageFolder loader (PIL, RGB), raising UnreadableImageError naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as file:
            return Image.open(file).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        reason = ("not an image format PIL can identify" if isinstance(error, UnidentifiedImageError)
                  else (str(error).strip().splitlines() or [type(error).__name__])[0])
        raise UnreadableImageError(f"cannot read image {path} ({reason}); replace or delete the file") from error


def load_imagefolder(path: Path, split: str, required: bool) -> Dataset | None:
    from torchvision import datasets

    folder = path / split
    if not folder.is_dir():
        if required:
            raise DatasetNotFoundError(_offline_help("imagefolder", folder, None))
        return None
    try:
        return datasets.ImageFolder(str(folder), loader=read_image)
    except FileNotFoundError as error:  # no class folder, or no image file in any of them
        reason = (str(error).strip().splitlines() or [""])[0]
        raise DatasetNotFoundError(f"data.imagefolder {folder} holds no images ({reason}); expected "
                                   f"{folder}/<class>/<image> files (.png, .jpg, ...)") from error


def split_indices(size: int, val_split: float | int, seed: int) -> tuple[list[int], list[int]]:
    """(train_indices, val_indices): a seeded random permutation, the last `n_val` go to val.

    n_val = val_split if it is an int >= 1, else round(val_split * size) for 0 <= val_split < 1.
    Random rather than "the last N files" because ImageFolder orders files by class.
    """
    if isinstance(val_split, float) and not 0 <= val_split < 1:
        raise ValueError(f"data.val_split as a fraction must be in [0, 1), got {val_split}")
    n_val = int(val_split) if isinstance(val_split, int) or val_split >= 1 else round(val_split * size)
    if not 0 <= n_val < size:
        raise ValueError(f"data.val_split={val_split} leaves no training images (train set has {size})")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[: size - n_val]), sorted(order[size - n_val:])


def build_data(cfg: Any) -> DataBundle:
    """The train / val / test datasets described by a `configs/data/*.yaml` node."""
    name = cfg.name
    if name not in DATASETS:
        raise ValueError(f"unknown data.name {name!r}; valid: {', '.join(DATASETS)}")
    channels, image_size, num_classes = int(cfg.channels), int(cfg.image_size), int(cfg.num_classes)
    generated_val = None
    if name == "synthetic":
        for key, least in (("num_train", 1), ("num_test", 0), ("num_val", 0)):
            value = cfg.get(key, 0)
            if not (isinstance(value, int) and value >= least):
                raise ValueError(f"data.{key} must be an int >= {least}, got {value!r}")
        train_base = SyntheticImages(cfg.num_train, num_classes, channels, image_size, cfg.seed)
        test_base = SyntheticImages(cfg.num_test, num_classes, channels, image_size, cfg.seed + 1)
        if cfg.get("num_val"):
            generated_val = SyntheticImages(cfg.num_val, num_classes, channels, image_size, cfg.seed + 2)
        train_tf = eval_tf = None
    else:
        mean, std = NORMALIZATION[cfg.get("normalization") or name]
        train_tf, eval_tf = build_transforms(cfg.augment, mean, std, image_size)
        imagefolder = None if OmegaConf.is_missing(cfg, "imagefolder") else cfg.get("imagefolder")
        if name == "imagefolder" or imagefolder:
            if not imagefolder:
                raise ValueError("data=imagefolder needs data.imagefolder=<dir with train/<class>/>")
            path = as_path(imagefolder)
            train_base = load_imagefolder(path, "train", required=True)
            test_base = load_imagefolder(path, "test", required=False)
            if cfg.get("cache", False):
                train_base = InMemoryDataset(train_base)
                test_base = InMemoryDataset(test_base) if test_base is not None else None
        else:
            root = as_path(cfg.root)
            if name in ("mnist", "fashion_mnist"):
                copy_raw_files(name, as_path(cfg.source) if cfg.get("source") else None, root)
            train_base = load_torchvision(name, root, True, bool(cfg.download))
            test_base = load_torchvision(name, root, False, bool(cfg.download))
        if getattr(train_base, "classes", None) is not None and len(train_base.classes) != num_classes:
            raise ValueError(f"data.num_classes={num_classes} but {name} has "
                             f"{len(train_base.classes)} classes")
    val_split = cfg.get("val_split") or 0
    if generated_val is not None and val_split:
        raise ValueError(f"data.num_val={cfg.num_val} and data.val_split={val_split}: synthetic data takes "
                         f"one validation set; set one of them to 0")
    if generated_val is not None:
        train, val = TransformedSubset(train_base, None, train_tf), TransformedSubset(generated_val, None, None)
    elif val_split:
        train_idx, val_idx = split_indices(len(train_base), val_split, int(cfg.get("split_seed", 0)))
        train = TransformedSubset(train_base, train_idx, train_tf)
        val = TransformedSubset(train_base, val_idx, eval_tf)
    else:
        train, val = TransformedSubset(train_base, None, train_tf), None
    test = TransformedSubset(test_base, None, eval_tf) if test_base is not None else None
    return DataBundle(train, val, test, num_classes, channels, image_size)
