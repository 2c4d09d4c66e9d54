"""Build the CIFAR-10 subset that ``benchmarks/gpu_check.py`` trains on, in one ignored file.

    python benchmarks/make_gpu_data.py            # ../shared/data/CIFAR10-imagefolder -> .gpu_data/

The GPU machine receives the working tree plus the ignored paths a run carries, never
``../shared``, and everything that travels must stay under 64 MiB.  So this script decodes, once,
on a CPU machine:

* the first 2,000 training images of each class in the official order (20,000 images, exactly
  balanced; file name ``NNNNN.png`` = index in ``data_batch_1..5``),
* the 1,000 real test images of the tree,

into ``.gpu_data/cifar10_subset.npz``: uint8 arrays ``[N, 3, 32, 32]`` (NCHW, ready for
``torch.from_numpy``), int64 labels, the official indices, the class names, the trainer's
CIFAR-10 normalisation (``qat.train.data.DATASETS['cifar10']``) and a validation split of the 20,000
drawn by the trainer's own ``qat.train.data.split_indices`` (2,000 images, seed 0).  Raw, the images are
61.4 MiB, over the 60 MiB this file may take; the ``.npz`` is zip-deflated (``np.savez_compressed``)
and ``np.load`` gives back plain uint8 arrays.  The script refuses to write a file over 60 MiB.

Exit status 0, or 2 with one line ``make_gpu_data.py: error: ...`` for a missing tree, an unreadable
image, too few images of a class, or a result over the size cap.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))

DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "CIFAR10-imagefolder"
DEFAULT_OUT = REPO / ".gpu_data"
FILE_NAME = "cifar10_subset.npz"
MAX_BYTES = 60 * 2**20
PROG = "make_gpu_data.py"


class DataError(Exception):
    """Bad input: the message is printed as one line and the exit status is 2."""


def official_index(path: str) -> int:
    """The official CIFAR-10 index a ``NNNNN.png`` file name holds."""
    stem = Path(path).stem
    if not stem.isdigit():
        raise DataError(f"{path}: expected a file named NNNNN.png (the official CIFAR-10 index)")
    return int(stem)


def first_per_class(samples: list[tuple[str, int]], per_class: int, num_classes: int) -> list[tuple[str, int]]:
    """The ``per_class`` lowest-index samples of every class, in official index order."""
    chosen = []
    for label in range(num_classes):
        of_class = sorted((s for s in samples if s[1] == label), key=lambda s: official_index(s[0]))
        if len(of_class) < per_class:
            raise DataError(f"class {label} has {len(of_class)} training images, {per_class} needed")
        chosen += of_class[:per_class]
    return sorted(chosen, key=lambda s: official_index(s[0]))


def decode(samples: list[tuple[str, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint8 images [N, 3, H, W], int64 labels, int64 official indices) of (path, label) samples."""
    from qat.train.data import read_image

    images = np.stack([np.asarray(read_image(path), dtype=np.uint8).transpose(2, 0, 1) for path, _ in samples])
    labels = np.array([label for _, label in samples], dtype=np.int64)
    indices = np.array([official_index(path) for path, _ in samples], dtype=np.int64)
    return images, labels, indices


def build_arrays(source: Path, per_class: int, val_images: int) -> dict[str, np.ndarray]:
    """Every array the subset file holds (see the module docstring)."""
    from qat.train.data import DATASETS, DatasetNotFoundError, load_imagefolder, split_indices

    try:
        train = load_imagefolder(source, "train", required=True)
        test = load_imagefolder(source, "test", required=True)
    except DatasetNotFoundError as error:
        raise DataError(str(error).splitlines()[0]) from error
    if train.classes != test.classes:
        raise DataError(f"train classes {train.classes} differ from test classes {test.classes}")
    train_images, train_labels, train_indices = decode(first_per_class(train.samples, per_class, len(train.classes)))
    test_images, test_labels, test_indices = decode(sorted(test.samples, key=lambda s: official_index(s[0])))
    _, val_positions = split_indices(len(train_labels), val_images, seed=0)
    mean, std = DATASETS["cifar10"].normalization
    return {"train_images": train_images, "train_labels": train_labels, "train_indices": train_indices,
            "val_positions": np.array(val_positions, dtype=np.int64),
            "test_images": test_images, "test_labels": test_labels, "test_indices": test_indices,
            "classes": np.array(train.classes), "mean": np.array(mean, dtype=np.float32),
            "std": np.array(std, dtype=np.float32)}


def write_subset(arrays: dict[str, np.ndarray], out_dir: Path, max_bytes: int = MAX_BYTES) -> Path:
    """Write ``arrays`` to ``out_dir/cifar10_subset.npz`` (temp file + rename), refusing > max_bytes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / FILE_NAME
    partial = out_dir / (FILE_NAME + ".partial.npz")
    np.savez_compressed(partial, **arrays)
    size = partial.stat().st_size
    if size > max_bytes:
        partial.unlink()
        raise DataError(f"{final} would be {size / 2**20:.1f} MiB, over the {max_bytes / 2**20:.0f} MiB cap")
    os.replace(partial, final)
    return final


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe(arrays: dict[str, np.ndarray], path: Path) -> dict:
    """What was written, as printed and stored next to the file in meta.json."""
    counts = np.bincount(arrays["train_labels"], minlength=len(arrays["classes"]))
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256(path),
            "train_images": int(len(arrays["train_labels"])), "val_images": int(len(arrays["val_positions"])),
            "test_images": int(len(arrays["test_labels"])), "per_class": counts.tolist(),
            "classes": arrays["classes"].tolist(), "image_shape": list(arrays["train_images"].shape[1:])}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, status 2 (the project's convention, see qat/train/cli.py)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv=None) -> int:
    parser = _Parser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE,
                        help="CIFAR-10 ImageFolder tree with train/ and test/ (default: ../shared/data/...)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: .gpu_data/)")
    parser.add_argument("--per-class", type=int, default=2000, help="training images per class (default 2000)")
    parser.add_argument("--val", type=int, default=2000, help="validation images split off the subset (default 2000)")
    args = parser.parse_args(argv)
    if args.per_class < 1 or args.val < 1:
        parser.error("--per-class and --val must be >= 1")
    started = time.perf_counter()
    try:
        arrays = build_arrays(args.source, args.per_class, args.val)
        path = write_subset(arrays, args.out)
    except (DataError, OSError, ValueError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    meta = describe(arrays, path)
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {path}: {meta['bytes'] / 2**20:.1f} MiB, {meta['train_images']} training images "
          f"({meta['val_images']} of them the validation split), {meta['test_images']} test images, "
          f"per class {meta['per_class']}, sha256 {meta['sha256'][:16]}..., {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
