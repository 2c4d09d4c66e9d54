"""Datasets and loaders: torchvision datasets, ImageFolder trees, a validation split, synthetic data.

`build_data(cfg)` returns a `DataBundle` with train / val / test datasets (val and test may be None)
and the facts the trainer needs (classes, channels, image size). Every dataset is one `DatasetSpec` row
of the registry `DATASETS` (its statistics, shape, default augmentation, torchvision class and
builder); adding one is a row here plus `configs/data/<name>.yaml`. Base datasets are built without
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

Training subset (`data.train_subset`, default null = all): keep N of the training images (seeded),
for runs on a stated budget.

Validation split (`data.val_split`, carved from the train set with a seeded permutation): the
configs default to 5,000 images for MNIST, Fashion-MNIST, CIFAR-10/100 and 2 % for ImageFolder
trees, so best.pt is chosen on held-out training images and the test set only gives the final
figure. Synthetic data instead draws a separate validation set of `data.num_val` images (default: as
many as the test set) from the same distribution, so the tiny smoke configs keep every training image.

Token datasets (a row with `task="language_model"`, e.g. `pydoc`): byte-level text from the files
`<data.root>/<name>/{train,val,test}.txt` (`python -m qat.train.text_corpus` writes them), cut into
windows of `data.block_size` bytes as `qat.train.tokens` describes (an epoch is
`data.windows_per_epoch` random training windows); the bundle's inputs are int64 token ids of shape
(block_size,), its classes the 256 byte values.
"""
from __future__ import annotations

import hashlib
import json
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

AUGMENTATIONS = ("none", "crop_flip", "imagenet")
#: mean / std that `data.normalization: imagenet` names (ImageFolder trees default to it)
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


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
    task: str = "classification"  # the row's task (qat.train.tasks): classification | language_model
    input_shape: tuple[int, ...] | None = None  # one input without batch dim, where it is not (C, H, W)
    input_dtype: torch.dtype | None = None  # the inputs' dtype where it is not the model's (token ids)

    @property
    def input_size(self) -> tuple[int, ...]:
        if self.input_shape is not None:
            return self.input_shape
        return (self.channels, self.image_size, self.image_size)


@dataclass
class BaseSplits:
    """What a dataset builder returns, without transforms: train and test (None when the dataset has
    none), and val only for a dataset that draws its own (else `build_data` carves it from train)."""
    train: Dataset
    test: Dataset | None
    val: Dataset | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """One row of the dataset registry (`DATASETS`): what the framework knows about a dataset.

    `build(spec, data_cfg)` returns its `BaseSplits`. The other fields are the dataset's facts, which
    its `configs/data/<name>.yaml` repeats as defaults (a test checks they agree); a field is None
    where it does not apply or is not fixed (an ImageFolder tree's class count; a token dataset
    would have no channels, image size, normalization or augmentation).
    """
    name: str
    build: Callable[[DatasetSpec, Any], BaseSplits]
    classes: int | None = None
    channels: int | None = None
    image_size: int | None = None
    #: per-channel (mean, std) of the decoded images; None: the builder yields finished tensors, no transforms
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    augment: str | None = None  # the default data.augment, one of AUGMENTATIONS
    torchvision_class: str | None = None  # its class in torchvision.datasets
    torchvision_folder: str | None = None  # the folder that class reads under data.root
    raw_files: bool = False  # torchvision's md5-listed raw .gz files, copied from data.source when missing
    task: str = "classification"  # what the trainer does with it (qat.train.tasks): classification | language_model


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


def _offline_help(spec: DatasetSpec, looked_in: Path, cause: BaseException | None) -> str:
    folder = spec.torchvision_folder
    reason = (str(cause).strip().splitlines() or [""])[0] if cause else ""
    lines = [f"dataset {spec.name!r} not found in {looked_in}"
             + (f" and it could not be downloaded ({type(cause).__name__}: {reason})" if cause else "")]
    if spec.raw_files:
        lines.append(f"provide the four torchvision .gz files in {looked_in}/raw/, or set "
                     f"data.source=<dir holding {folder}/raw/> (e.g. ../shared/data) to copy them, "
                     f"or set data.root / env QAT_DATA to a folder that has {folder}/raw/")
    elif folder is not None:
        lines.append(f"put torchvision's extracted {folder}/ under data.root (env QAT_DATA), or read an "
                     f"ImageFolder tree with data.imagefolder=<dir with train/<class>/ and test/<class>/>")
    else:
        lines.append("set data.imagefolder=<dir with train/<class>/ and optionally test/<class>/>")
    return "; ".join(lines)


def raw_resources(name: str) -> list[tuple[str, str]]:
    """(file name, md5) of the raw files of MNIST / FashionMNIST, as torchvision publishes them."""
    return [(file, md5) for file, md5 in torchvision_class(get_dataset(name)).resources]


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
    folder = get_dataset(name).torchvision_folder
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
    """The torchvision dataset of registry row `name` (MNIST, CIFAR10, ...), one split, no transform."""
    spec = get_dataset(name)
    try:
        return torchvision_class(spec)(str(root), train=train, download=download)
    except (RuntimeError, OSError) as error:  # urllib errors are OSErrors
        raise DatasetNotFoundError(_offline_help(spec, root / spec.torchvision_folder,
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
            raise DatasetNotFoundError(_offline_help(DATASETS["imagefolder"], folder, None))
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


# ------------------------------------------------------------------ builders and the registry
def _imagefolder_path(cfg: Any) -> str | None:
    return None if OmegaConf.is_missing(cfg, "imagefolder") else cfg.get("imagefolder")


def build_synthetic(spec: DatasetSpec, cfg: Any) -> BaseSplits:
    """`SyntheticImages` of data.num_train / num_test (seeds seed, seed + 1) and, when data.num_val > 0, a
    validation set drawn the same way (seed + 2): tensors already, so no transforms."""
    for key, least in (("num_train", 1), ("num_test", 0), ("num_val", 0)):
        value = cfg.get(key, 0)
        if not (isinstance(value, int) and value >= least):
            raise ValueError(f"data.{key} must be an int >= {least}, got {value!r}")
    shape = int(cfg.num_classes), int(cfg.channels), int(cfg.image_size)
    train = SyntheticImages(cfg.num_train, *shape, cfg.seed)
    test = SyntheticImages(cfg.num_test, *shape, cfg.seed + 1)
    val = SyntheticImages(cfg.num_val, *shape, cfg.seed + 2) if cfg.get("num_val") else None
    return BaseSplits(train, test, val)


def build_imagefolder(spec: DatasetSpec, cfg: Any) -> BaseSplits:
    """The ImageFolder tree at data.imagefolder: train/ (required) and test/ (optional), decoded once and
    kept in memory when data.cache is set."""
    imagefolder = _imagefolder_path(cfg)
    if not imagefolder:
        raise ValueError("data=imagefolder needs data.imagefolder=<dir with train/<class>/>")
    path = as_path(imagefolder)
    train = load_imagefolder(path, "train", required=True)
    test = load_imagefolder(path, "test", required=False)
    if cfg.get("cache", False):
        train = InMemoryDataset(train)
        test = InMemoryDataset(test) if test is not None else None
    return BaseSplits(train, test)


def build_torchvision(spec: DatasetSpec, cfg: Any) -> BaseSplits:
    """torchvision's files under data.root (raw files first copied from data.source where the row has
    them), or, when data.imagefolder is set, an ImageFolder tree of the same dataset instead."""
    if _imagefolder_path(cfg):
        return build_imagefolder(spec, cfg)
    root = as_path(cfg.root)
    if spec.raw_files:
        copy_raw_files(spec.name, as_path(cfg.source) if cfg.get("source") else None, root)
    return BaseSplits(load_torchvision(spec.name, root, True, bool(cfg.download)),
                      load_torchvision(spec.name, root, False, bool(cfg.download)))


def read_text_split(folder: Path, split: str, manifest: dict | None) -> torch.Tensor:
    """The byte tokens of `<folder>/<split>.txt`, checked against the manifest's sha256 when there is one."""
    from qat.train.tokens import encode

    path = folder / f"{split}.txt"
    if not path.is_file():
        raise DatasetNotFoundError(f"no {path}: build the corpus with `python -m qat.train.text_corpus --out {folder}` "
                                   f"(or set data.root / env QAT_DATA to the folder holding {folder.name}/)")
    data = path.read_bytes()
    expected = ((manifest or {}).get("files", {}).get(split) or {}).get("sha256")
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise CorruptDataError(f"{path} does not match the sha256 in {folder / 'manifest.json'}; rebuild the corpus "
                               f"with `python -m qat.train.text_corpus --out {folder}`")
    return encode(data.decode("utf-8"))


def build_text_corpus(spec: DatasetSpec, cfg: Any) -> BaseSplits:
    """Byte-level windows of `<data.root>/<name>/{train,val,test}.txt` (module docstring, qat.train.tokens)."""
    from qat.train.tokens import ContiguousWindows, RandomWindows

    folder = as_path(cfg.root) / spec.name
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    block_size, eval_windows = cfg.block_size, cfg.get("eval_windows")
    train = RandomWindows(read_text_split(folder, "train", manifest), block_size, cfg.windows_per_epoch)
    val = ContiguousWindows(read_text_split(folder, "val", manifest), block_size, eval_windows, "val")
    test_path = folder / "test.txt"
    test = (ContiguousWindows(read_text_split(folder, "test", manifest), block_size, eval_windows, "test")
            if test_path.is_file() else None)
    return BaseSplits(train, test, val)


#: The dataset registry, the only place that lists datasets: `data.name` picks a row, and
#: `configs/data/<name>.yaml` holds its defaults (a test checks the two agree).
DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec("mnist", build_torchvision, classes=10, channels=1, image_size=28,
                normalization=((0.1307,), (0.3081,)), augment="none",
                torchvision_class="MNIST", torchvision_folder="MNIST", raw_files=True),
    DatasetSpec("fashion_mnist", build_torchvision, classes=10, channels=1, image_size=28,
                normalization=((0.2860,), (0.3530,)), augment="none",
                torchvision_class="FashionMNIST", torchvision_folder="FashionMNIST", raw_files=True),
    DatasetSpec("cifar10", build_torchvision, classes=10, channels=3, image_size=32,
                normalization=((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)), augment="crop_flip",
                torchvision_class="CIFAR10", torchvision_folder="cifar-10-batches-py"),
    DatasetSpec("cifar100", build_torchvision, classes=100, channels=3, image_size=32,
                normalization=((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)), augment="crop_flip",
                torchvision_class="CIFAR100", torchvision_folder="cifar-100-python"),
    # Any tree: its class count is whatever the tree holds; ImageNet-style size and statistics by default.
    DatasetSpec("imagefolder", build_imagefolder, channels=3, image_size=224, normalization=IMAGENET_STATS,
                augment="imagenet"),
    # Shape defaults only: data.num_classes / channels / image_size draw any shape.
    DatasetSpec("synthetic", build_synthetic, classes=10, channels=3, image_size=32),
    # English text of the Python 3.11 documentation (python -m qat.train.text_corpus), 256 byte values.
    DatasetSpec("pydoc", build_text_corpus, classes=256, task="language_model"),
)}


def dataset_names() -> list[str]:
    """The registered dataset names, in registry order."""
    return list(DATASETS)


def get_dataset(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"unknown data.name {name!r}; valid: {', '.join(DATASETS)}")
    return DATASETS[name]


def normalization_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) that `data.normalization` names: a registry row that has them, or 'imagenet'."""
    stats = {"imagenet": IMAGENET_STATS,
             **{spec.name: spec.normalization for spec in DATASETS.values() if spec.normalization is not None}}
    if name not in stats:
        raise ValueError(f"unknown data.normalization {name!r}; valid: {', '.join(stats)}")
    return stats[name]


def torchvision_class(spec: DatasetSpec) -> type:
    """The torchvision.datasets class a row names (imported here: torchvision is slow to import)."""
    from torchvision import datasets

    if spec.torchvision_class is None:
        raise ValueError(f"dataset {spec.name!r} is not a torchvision dataset")
    return getattr(datasets, spec.torchvision_class)


def build_data(cfg: Any) -> DataBundle:
    """The train / val / test datasets described by a `configs/data/*.yaml` node."""
    spec = get_dataset(cfg.name)
    if spec.task == "language_model":
        bases = spec.build(spec, cfg)
        block_size = int(cfg.block_size)
        if int(cfg.num_classes) != spec.classes:
            raise ValueError(f"data.num_classes={cfg.num_classes} but {spec.name} is byte-level: its vocabulary "
                             f"has {spec.classes} tokens")
        return DataBundle(bases.train, bases.val, bases.test, int(cfg.num_classes), channels=1,
                          image_size=block_size, task=spec.task, input_shape=(block_size,), input_dtype=torch.long)
    channels, image_size, num_classes = int(cfg.channels), int(cfg.image_size), int(cfg.num_classes)
    train_tf = eval_tf = None
    if spec.normalization is not None:  # decoded images: ToTensor + Normalize, augmented for training
        mean, std = normalization_stats(cfg.get("normalization") or spec.name)
        train_tf, eval_tf = build_transforms(cfg.get("augment") or spec.augment, mean, std, image_size)
    bases = spec.build(spec, cfg)
    train_base, test_base, generated_val = bases.train, bases.test, bases.val
    if getattr(train_base, "classes", None) is not None and len(train_base.classes) != num_classes:
        raise ValueError(f"data.num_classes={num_classes} but {spec.name} has "
                         f"{len(train_base.classes)} classes")
    val_split = cfg.get("val_split") or 0
    if generated_val is not None and val_split:
        raise ValueError(f"data.num_val={cfg.num_val} and data.val_split={val_split}: {spec.name} data takes "
                         f"one validation set; set one of them to 0")
    if generated_val is not None:
        train, val = TransformedSubset(train_base, None, train_tf), TransformedSubset(generated_val, None, eval_tf)
    elif val_split:
        train_idx, val_idx = split_indices(len(train_base), val_split, int(cfg.get("split_seed", 0)))
        train = TransformedSubset(train_base, train_idx, train_tf)
        val = TransformedSubset(train_base, val_idx, eval_tf)
    else:
        train, val = TransformedSubset(train_base, None, train_tf), None
    subset = cfg.get("train_subset")
    if subset is not None:
        train = train_subset(train, subset, int(cfg.get("split_seed", 0)))
    test = TransformedSubset(test_base, None, eval_tf) if test_base is not None else None
    return DataBundle(train, val, test, num_classes, channels, image_size)


def train_subset(train: TransformedSubset, size: Any, seed: int) -> TransformedSubset:
    """`data.train_subset=N`: N training images drawn (seeded permutation, seed split_seed + 1) from
    what the validation split left, for runs on a stated budget; the validation and test sets stay
    whole."""
    available = len(train)
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= available:
        raise ValueError(f"data.train_subset must be null or an int in [1, {available}] (the training images "
                         f"left after the validation split), got {size!r}")
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed + 1))[:size].sort().values
    indices = order.tolist() if train.indices is None else [train.indices[i] for i in order.tolist()]
    return TransformedSubset(train.base, indices, train.transform)
