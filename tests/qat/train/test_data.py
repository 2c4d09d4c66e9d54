"""Datasets: the registry and its configs, synthetic data, the validation split, ImageFolder trees,
offline errors, real MNIST."""

import gzip

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import CONFIGS, SHARED_DATA
from qat.train.data import (
    DATASETS,
    CorruptDataError,
    DatasetNotFoundError,
    UnreadableImageError,
    build_data,
    dataset_names,
    md5sum,
    normalization_stats,
    split_indices,
)


# ------------------------------------------------------------------ the registry and configs/data/
def test_every_registry_row_has_a_config_and_every_config_names_a_row():
    configs = sorted(path.stem for path in (CONFIGS / "data").glob("*.yaml"))
    assert configs == sorted(DATASETS), "configs/data/<name>.yaml and the DATASETS rows differ"


@pytest.mark.parametrize("name", dataset_names())
def test_each_config_states_its_registry_row(compose, name):
    data, spec = compose([f"data={name}"]).data, DATASETS[name]
    assert data.name == spec.name
    for key, fact in (("num_classes", spec.classes), ("channels", spec.channels), ("image_size", spec.image_size),
                      ("augment", spec.augment)):
        if fact is not None:
            assert data[key] == fact, f"configs/data/{name}.yaml: {key}={data[key]}, its registry row says {fact}"
    if spec.normalization is not None:
        assert normalization_stats(data.get("normalization") or name) == spec.normalization


def test_unknown_dataset_and_normalization_name_the_valid_ones():
    with pytest.raises(ValueError, match="unknown data.name 'svhn'; valid: " + ", ".join(dataset_names())):
        build_data(data_cfg(name="svhn"))
    with pytest.raises(ValueError, match="unknown data.normalization 'svhn'; valid: imagenet, mnist"):
        normalization_stats("svhn")


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


# ------------------------------------------------------------------ default validation split
@pytest.mark.parametrize("name", dataset_names())
def test_every_dataset_config_holds_out_validation_images_by_default(compose, name):
    data = compose([f"data={name}"]).data
    if DATASETS[name].task == "language_model":  # held-out pages in val.txt / test.txt (qat.train.text_corpus)
        assert "val_split" not in data
    elif data.get("num_val"):  # draws its own validation set (synthetic), tested below
        assert data.val_split == 0
    else:  # 5,000 images carved from the train set; 2 % of an ImageFolder tree of unknown size
        assert data.val_split == (0.02 if name == "imagefolder" else 5000) and data.split_seed == 0


def test_synthetic_data_draws_its_own_validation_set_and_keeps_every_training_image(compose, smoke_overrides):
    cfg = compose(smoke_overrides)
    assert (cfg.data.num_val, cfg.data.val_split) == (cfg.data.num_test, 0)
    bundle = build_data(cfg.data)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (16, 8, 8)
    train = torch.stack([bundle.train[i][0] for i in range(16)]).flatten(1)
    val = torch.stack([bundle.val[i][0] for i in range(8)]).flatten(1)
    test = torch.stack([bundle.test[i][0] for i in range(8)]).flatten(1)
    assert torch.cdist(val, train).min() > 1 and torch.cdist(val, test).min() > 1  # no shared image
    with pytest.raises(ValueError, match="data.num_val=8 and data.val_split=4"):
        build_data(OmegaConf.merge(cfg.data, {"val_split": 4}))


def assert_seeded_disjoint_split(bundle, size, n_val):
    assert (len(bundle.train), len(bundle.val)) == (size - n_val, n_val)
    train, val = set(bundle.train.indices), set(bundle.val.indices)
    assert not train & val and train | val == set(range(size))
    assert bundle.train.base is bundle.val.base  # both carved from the one training set


@pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").is_dir(), reason="no shared MNIST copy")
def test_mnist_default_config_validates_on_5000_training_images(compose, tmp_path):
    cfg = compose(["data=mnist", f"data.root={tmp_path}", f"data.source={SHARED_DATA}"]).data
    first, second = build_data(cfg), build_data(cfg)
    assert_seeded_disjoint_split(first, 60000, 5000)
    assert first.val.indices == second.val.indices and len(first.test) == 10000


@pytest.mark.skipif(not (SHARED_DATA / "CIFAR10-imagefolder" / "train").is_dir(), reason="no shared CIFAR-10 tree")
def test_cifar10_default_config_validates_on_5000_training_images(compose):
    cfg = compose(["data=cifar10", f"data.imagefolder={SHARED_DATA / 'CIFAR10-imagefolder'}", "data.cache=false"])
    bundle = build_data(cfg.data)
    assert_seeded_disjoint_split(bundle, 50000, 5000)
    assert len(bundle.test) == 1000


# ------------------------------------------------------------------ empty trees, unreadable images
def test_empty_imagefolder_names_the_folder_and_what_it_should_hold(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    cfg = OmegaConf.create(dict(name="cifar10", imagefolder=str(tmp_path), num_classes=2, channels=3,
                                image_size=8, augment="none", batch_size=2, eval_batch_size=2))
    with pytest.raises(DatasetNotFoundError, match=f"data.imagefolder {tmp_path / 'train'} holds no images"):
        build_data(cfg)


@pytest.mark.parametrize("cache", [True, False])
def test_unreadable_image_names_the_file(tmp_path, cache):
    make_tree(tmp_path)
    broken = tmp_path / "train" / "dog" / "00002.png"
    broken.write_bytes(broken.read_bytes()[:40])  # a truncated PNG
    cfg = OmegaConf.create(dict(name="cifar10", imagefolder=str(tmp_path), cache=cache, num_classes=2, channels=3,
                                image_size=8, augment="none", val_split=0, batch_size=2, eval_batch_size=2))
    with pytest.raises(UnreadableImageError, match=f"cannot read image {broken}"):
        bundle = build_data(cfg)
        [bundle.train[i] for i in range(len(bundle.train))]


def test_imagefolder_config_without_a_folder_says_what_to_set(compose):
    with pytest.raises(ValueError, match=r"data=imagefolder needs data.imagefolder=<dir with train/<class>/>"):
        build_data(compose(["data=imagefolder"]).data)


# ------------------------------------------------------------------ md5-checked raw files
def mnist_cfg(root, source):
    return OmegaConf.create(dict(name="mnist", root=str(root), source=str(source) if source else None, download=True,
                                 num_classes=10, channels=1, image_size=28, augment="none", val_split=0,
                                 batch_size=2, eval_batch_size=2))


def copy_of_shared_mnist(folder, truncate=None):
    raw = folder / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for file in (SHARED_DATA / "MNIST" / "raw").glob("*.gz"):
        data = file.read_bytes()
        (raw / file.name).write_bytes(data[: len(data) // 2] if file.name == truncate else data)
    return raw


needs_mnist = pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").is_dir(), reason="no shared MNIST copy")
LABELS = "t10k-labels-idx1-ubyte.gz"


@needs_mnist
def test_corrupt_source_file_is_named_and_never_copied_and_fixing_the_source_helps(tmp_path):
    source_raw = copy_of_shared_mnist(tmp_path / "source", truncate=LABELS)
    root = tmp_path / "root"
    with pytest.raises(CorruptDataError) as error:
        build_data(mnist_cfg(root, tmp_path / "source"))
    assert f"data.source file {source_raw / LABELS} is corrupt" in str(error.value)
    assert "ec29112dd5afa0611ce80d1b7f02629c" in str(error.value)  # torchvision's sum, the right one
    assert LABELS not in {p.name for p in (root / "MNIST" / "raw").iterdir()}
    assert not list((root / "MNIST" / "raw").glob(".*partial"))
    (source_raw / LABELS).write_bytes((SHARED_DATA / "MNIST" / "raw" / LABELS).read_bytes())
    bundle = build_data(mnist_cfg(root, tmp_path / "source"))
    assert bundle.test[0][1] == 7 and len(bundle.test) == 10000


@needs_mnist
def test_a_corrupt_copy_left_in_root_is_replaced_from_an_intact_source(tmp_path):
    # What earlier versions left behind: a truncated .gz (and what torchvision unpacked from it).
    root_raw = copy_of_shared_mnist(tmp_path / "root", truncate=LABELS)
    for file in root_raw.glob("*.gz"):  # all four unpacked, the labels only partly: torchvision would use them
        (root_raw / file.stem).write_bytes(b"\x00\x00\x08\x01 partial" if file.name == LABELS
                                           else gzip.decompress(file.read_bytes()))
    bundle = build_data(mnist_cfg(tmp_path / "root", SHARED_DATA))
    assert md5sum(root_raw / LABELS) == "ec29112dd5afa0611ce80d1b7f02629c"
    assert bundle.test[0][1] == 7 and len(bundle.test) == 10000


@needs_mnist
def test_a_corrupt_copy_in_root_without_a_source_is_named(tmp_path):
    root_raw = copy_of_shared_mnist(tmp_path / "root", truncate=LABELS)
    with pytest.raises(CorruptDataError, match=f"{root_raw / LABELS} is corrupt: md5 [0-9a-f]{{32}}, expected ec29"):
        build_data(mnist_cfg(tmp_path / "root", None))


def test_train_subset_keeps_n_seeded_training_images_and_the_whole_val_set():
    from omegaconf import OmegaConf

    from qat.train.data import build_data

    base = {"name": "synthetic", "num_classes": 3, "channels": 1, "image_size": 4, "num_train": 50,
            "num_test": 10, "num_val": 0, "val_split": 10, "seed": 0, "split_seed": 0}
    full = build_data(OmegaConf.create(base))
    small = build_data(OmegaConf.create({**base, "train_subset": 7}))
    again = build_data(OmegaConf.create({**base, "train_subset": 7}))
    assert len(full.train) == 40 and len(small.train) == 7 and len(small.val) == len(full.val) == 10
    assert small.train.indices == again.train.indices
    assert set(small.train.indices) <= set(full.train.indices)
    assert not set(small.train.indices) & set(full.val.indices)
    with pytest.raises(ValueError, match="train_subset"):
        build_data(OmegaConf.create({**base, "train_subset": 41}))
