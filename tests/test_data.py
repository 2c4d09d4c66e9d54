"""Datasets: synthetic data, the validation split, ImageFolder trees, offline errors, real MNIST."""

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import SHARED_DATA
from qat.data import DatasetNotFoundError, build_data, split_indices


def data_cfg(**values):
    base = dict(name="synthetic", num_train=20, num_test=6, seed=0, num_classes=4, channels=3,
                image_size=8, val_split=0, split_seed=0, batch_size=4, eval_batch_size=4)
    return OmegaConf.create({**base, **values})


def test_synthetic_data_is_deterministic_and_class_dependent():
    first, second = build_data(data_cfg()), build_data(data_cfg())
    assert torch.equal(first.train[3][0], second.train[3][0])
    assert len(first.train) == 20 and len(first.test) == 6 and first.val is None
    images = torch.stack([first.train[i][0] for i in range(20)])
    labels = torch.tensor([first.train[i][1] for i in range(20)])
    # Class means differ: the data carries signal for the smoke tests to learn.
    means = torch.stack([images[labels == c].mean(0) for c in range(4)])
    assert (means[0] - means[1]).abs().mean() > 0.5


def test_validation_split_is_disjoint_and_sized():
    train, val = split_indices(100, 0.2, seed=0)
    assert len(train) == 80 and len(val) == 20 and not set(train) & set(val)
    assert set(train) | set(val) == set(range(100))
    assert split_indices(100, 30, seed=0)[1] != split_indices(100, 30, seed=1)[1]
    with pytest.raises(ValueError, match="leaves no training images"):
        split_indices(10, 10, seed=0)
    bundle = build_data(data_cfg(val_split=5))
    assert len(bundle.train) == 15 and len(bundle.val) == 5


def make_tree(root, classes=("cat", "dog"), per_class=5, splits=("train",)):
    for split in splits:
        for index, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), (40 * index + i, 0, 0)).save(root / split / name / f"{i:05d}.png")


def test_imagefolder_tree_with_val_split_uses_eval_transform_for_val(tmp_path):
    make_tree(tmp_path, splits=("train", "test"))
    cfg = OmegaConf.create(dict(name="cifar10", imagefolder=str(tmp_path), cache=True, num_classes=2,
                                channels=3, image_size=8, augment="crop_flip", val_split=4, split_seed=0,
                                batch_size=2, eval_batch_size=2))
    bundle = build_data(cfg)
    assert len(bundle.train) == 6 and len(bundle.val) == 4 and len(bundle.test) == 10
    image, label = bundle.val[0]
    assert image.shape == (3, 8, 8) and label in (0, 1)
    # The eval transform is deterministic; the train transform (crop + flip) is not.
    assert torch.equal(bundle.val[0][0], bundle.val[0][0])


def test_wrong_class_count_is_reported(tmp_path):
    make_tree(tmp_path)
    cfg = OmegaConf.create(dict(name="imagefolder", imagefolder=str(tmp_path), num_classes=1000, channels=3,
                                image_size=8, augment="none", normalization="imagenet", batch_size=2,
                                eval_batch_size=2))
    with pytest.raises(ValueError, match="num_classes=1000 but imagefolder has 2 classes"):
        build_data(cfg)


def test_missing_dataset_offline_names_the_path_and_the_fix(tmp_path):
    cfg = OmegaConf.create(dict(name="mnist", root=str(tmp_path / "nowhere"), source=None, download=False,
                                num_classes=10, channels=1, image_size=28, augment="none", batch_size=2,
                                eval_batch_size=2))
    with pytest.raises(DatasetNotFoundError) as error:
        build_data(cfg)
    message = str(error.value)
    assert str(tmp_path / "nowhere" / "MNIST") in message and "data.source" in message and "QAT_DATA" in message


def test_missing_imagefolder_names_the_folder(tmp_path):
    cfg = OmegaConf.create(dict(name="cifar10", imagefolder=str(tmp_path / "tree"), num_classes=10, channels=3,
                                image_size=32, augment="crop_flip", batch_size=2, eval_batch_size=2))
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "tree" / "train")):
        build_data(cfg)


def test_bad_source_folder_is_reported(tmp_path):
    cfg = OmegaConf.create(dict(name="fashion_mnist", root=str(tmp_path / "root"), source=str(tmp_path),
                                download=True, num_classes=10, channels=1, image_size=28, augment="none",
                                batch_size=2, eval_batch_size=2))
    with pytest.raises(DatasetNotFoundError, match="has no FashionMNIST/raw/ folder"):
        build_data(cfg)


@pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").is_dir(),
                    reason=f"no MNIST copy at {SHARED_DATA / 'MNIST' / 'raw'}")
def test_mnist_loads_offline_from_a_copy_of_the_shared_raw_files(tmp_path):
    cfg = OmegaConf.create(dict(name="mnist", root=str(tmp_path / "data"), source=str(SHARED_DATA),
                                download=True, num_classes=10, channels=1, image_size=28, augment="none",
                                val_split=5000, split_seed=0, batch_size=2, eval_batch_size=2))
    bundle = build_data(cfg)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (55000, 5000, 10000)
    image, label = bundle.test[0]
    assert image.shape == (1, 28, 28) and label == 7  # the first MNIST test digit is a 7
    # The shared folder stays untouched: the files were copied (and unpacked) under root.
    assert (tmp_path / "data" / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").is_file()
    assert sorted(p.name for p in (SHARED_DATA / "MNIST" / "raw").iterdir()) == sorted(
        p.name for p in (SHARED_DATA / "MNIST" / "raw").iterdir() if p.suffix == ".gz")
