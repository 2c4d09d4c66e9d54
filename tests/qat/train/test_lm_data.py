"""Byte tokens and windows of the language-model task (qat.train.tokens, data=pydoc), its metrics."""
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from qat.train.data import CorruptDataError, DatasetNotFoundError, build_data
from qat.train.metrics import TokenMetricSums
from qat.train.tasks import get_task
from qat.train.tokens import ContiguousWindows, RandomWindows, decode, encode

TEXT = "The quick brown fox jumps over the lazy dog. Ünïcödé bytes too. " * 20


def write_corpus(root, text=TEXT):
    folder = root / "pydoc"
    folder.mkdir(parents=True)
    for split, part in (("train", text), ("val", text[:400]), ("test", text[100:600])):
        (folder / f"{split}.txt").write_text(part, encoding="utf-8")
    return folder


def test_tokens_are_utf8_bytes():
    tokens = encode("aé")
    assert tokens.tolist() == [97, 0xC3, 0xA9] and decode(tokens) == "aé"


def test_random_windows_are_reproducible_per_seed_and_epoch():
    tokens = encode(TEXT)
    a, b = RandomWindows(tokens, 16, 10), RandomWindows(tokens, 16, 10)
    a.resample(3, 2)
    b.resample(3, 2)
    assert torch.equal(a.offsets, b.offsets)
    x, y = a[4]
    assert x.shape == y.shape == (16,) and x.dtype == torch.long
    assert torch.equal(x[1:], y[:-1])                       # y is x shifted by one byte
    start = int(a.offsets[4])
    assert torch.equal(x, tokens[start:start + 16].long())
    b.resample(3, 3)
    assert not torch.equal(a.offsets, b.offsets)            # another epoch, other windows
    b.resample(4, 2)
    assert not torch.equal(a.offsets, b.offsets)            # another seed, other windows
    assert int(a.offsets.max()) + 17 <= tokens.numel()


def test_contiguous_windows_cover_the_text_once():
    tokens = encode(TEXT[:101])
    windows = ContiguousWindows(tokens, 10)
    assert len(windows) == 10                               # (101 - 1) // 10
    targets = torch.cat([windows[i][1] for i in range(len(windows))])
    assert torch.equal(targets, tokens[1:101].long())       # every byte after the first predicted once
    assert len(ContiguousWindows(tokens, 10, max_windows=3)) == 3
    with pytest.raises(ValueError, match="fewer than data.block_size"):
        ContiguousWindows(tokens[:5], 10)


def test_bits_per_byte_is_loss_over_ln2():
    task = get_task("language_model")
    logits = torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(1))
    loss = task.loss(logits, targets)
    assert loss.item() == pytest.approx(F.cross_entropy(logits.reshape(10, 256), targets.reshape(10)).item())
    sums = TokenMetricSums("cpu")
    sums.update(loss, logits, targets)
    sums.update(loss * 0 + 2.0, logits, targets)
    result = sums.result("val")
    mean = (loss.item() + 2.0) / 2
    assert result["val/loss"] == pytest.approx(mean)
    assert result["val/bpb"] == pytest.approx(mean / math.log(2))
    assert result["val/ppl"] == pytest.approx(math.exp(mean))


def pydoc_cfg(root, **values):
    base = dict(name="pydoc", root=str(root), num_classes=256, block_size=16, windows_per_epoch=12, eval_windows=None,
                batch_size=4, eval_batch_size=4)
    return OmegaConf.create({**base, **values})


def test_pydoc_bundle_from_a_tiny_corpus(tmp_path):
    write_corpus(tmp_path)
    data = build_data(pydoc_cfg(tmp_path))
    assert data.task == "language_model" and data.input_size == (16,) and data.input_dtype == torch.long
    assert len(data.train) == 12 and len(data.val) == (len(TEXT[:400].encode()) - 1) // 16
    assert data.num_classes == 256


def test_pydoc_errors_name_the_fix(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="python -m qat.train.text_corpus"):
        build_data(pydoc_cfg(tmp_path))
    folder = write_corpus(tmp_path)
    (folder / "manifest.json").write_text('{"files": {"train": {"sha256": "00"}}}')
    with pytest.raises(CorruptDataError, match="does not match the sha256"):
        build_data(pydoc_cfg(tmp_path))
    (folder / "manifest.json").unlink()
    with pytest.raises(ValueError, match="byte-level"):
        build_data(pydoc_cfg(tmp_path, num_classes=10))
