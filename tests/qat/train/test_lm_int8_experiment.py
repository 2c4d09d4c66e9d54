"""The lm_bitnet158 variants. lm_bitnet158_int8emb: the experiment composes to lm_bitnet158 plus 8-bit
embeddings and head, builds those layers, trains, and `python -m qat.export` packs the run into a file
that decides as it does. lm_bitnet158_fitted: lm_bitnet158 with its two departures and its peak lr."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf
from test_lm_data import write_corpus
from torch import nn

import layers
from qat.export.__main__ import main as export_main
from qat.train.trainer import Trainer

EXPERIMENT = "lm_bitnet158_int8emb"


def test_the_experiment_is_lm_bitnet158_with_8_bit_embeddings_and_head(compose):
    cfg, base = compose([f"+experiment={EXPERIMENT}"]), compose(["+experiment=lm_bitnet158"])
    quant = OmegaConf.to_container(cfg.quant)
    assert quant.pop("embeddings") == "int8" and quant.pop("overrides") == {"last": {"method": "int8"}}
    assert quant.pop("keep_fp") == []
    expected = OmegaConf.to_container(base.quant)
    assert "embeddings" not in expected and expected.pop("keep_fp") == ["last"] and expected.pop("overrides") == {}
    assert quant == expected
    for group in ("model", "data", "optim", "sched", "trainer"):  # the same recipe and budget
        assert cfg[group] == base[group], group


def tiny_run(compose, tmp_path):
    write_corpus(tmp_path / "data")
    cfg = compose([f"+experiment={EXPERIMENT}", f"data.root={tmp_path / 'data'}", "data.block_size=16",
                   "data.windows_per_epoch=8", "data.batch_size=4", "data.eval_batch_size=8", "data.eval_windows=4",
                   "model.depth=1", "model.width=16", "model.heads=2", "logger=none", "trainer.progress_bar=false",
                   "trainer.threads=1", "device=cpu", "trainer.max_steps=3"])
    trainer = Trainer(cfg, tmp_path / "run")
    return trainer, trainer.fit()


def test_a_run_trains_the_8_bit_layers_and_exports_a_file_that_decides_as_it_does(compose, tmp_path, capsys):
    trainer, summary = tiny_run(compose, tmp_path)
    model = trainer.model
    assert isinstance(model.tok_emb, layers.QuantizedEmbedding) and isinstance(model.pos_emb, layers.QuantizedEmbedding)
    assert model.head.method == "int8" and model.blocks[0].attn.qkv.method == "bitnet158"
    assert not any(type(m) in (nn.Linear, nn.Embedding) for m in model.modules())
    assert summary["steps"] == 3 and summary["best_val_bpb"] is not None
    out = tmp_path / "lm.safetensors"
    assert export_main([str(tmp_path / "run"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "identical greedy next bytes: True" in printed and "max |logit difference| 0 " in printed


@pytest.mark.parametrize("value", ["ternary", "bitnet158"])
def test_an_embedding_method_the_tables_cannot_take_is_refused(compose, tmp_path, value):
    write_corpus(tmp_path / "data")
    cfg = compose([f"+experiment={EXPERIMENT}", f"data.root={tmp_path / 'data'}", f"quant.embeddings={value}",
                   "model.depth=1", "model.width=16", "model.heads=2", "data.block_size=16", "logger=none",
                   "device=cpu"])
    with pytest.raises(ValueError, match=f"embeddings: '{value}' is not a method for embedding tables"):
        Trainer(cfg, tmp_path / "run")


def test_the_fitted_experiment_is_lm_bitnet158_with_its_two_departures_and_a_higher_peak_lr(compose):
    cfg, base = compose(["+experiment=lm_bitnet158_fitted"]), compose(["+experiment=lm_bitnet158"])
    quant, expected = OmegaConf.to_container(cfg.quant), OmegaConf.to_container(base.quant)
    assert (quant.pop("input_norm"), quant.pop("weight_scale")) == (False, "fitted")
    assert (expected.pop("input_norm"), expected.pop("weight_scale")) == (True, "absmean")
    assert quant == expected
    assert cfg.optim.lr == 2e-3 and base.optim.lr == 1.5e-3
    assert {**cfg.optim, "lr": None} == {**base.optim, "lr": None}
    for group in ("model", "data", "sched", "trainer"):  # the same model, data, schedule and steps
        assert cfg[group] == base[group], group
