"""The ASP workflow as one training run (experiment=mnist_bnn_ternary24): dense TWN until half of the
steps, then 2:4 with the mask frozen; the frozen mask is saved, survives a resume, and the trained
model exports in the 2:4 format."""
import torch

from layers import Ternary24Conv2d, Ternary24Linear, TernaryConv2d
from layers.sparse_ternary import mask24
from qat.export import pack_model
from qat.train.trainer import Trainer

# 16 synthetic images in batches of 8 for 2 epochs: 4 steps at progress 0, 0.25, 0.5, 0.75
TINY_RUN = ["trainer.epochs=2", "data.channels=1", "data.image_size=28"]


def sparse_layers(model):
    return [m for m in model.modules() if isinstance(m, (Ternary24Conv2d, Ternary24Linear))]


def test_asp_run_prunes_at_half_freezes_and_resumes(compose, smoke_overrides, tmp_path):
    first_half = compose(["+experiment=mnist_bnn_ternary24", *smoke_overrides, *TINY_RUN, "trainer.max_steps=3"])
    trainer = Trainer(first_half, tmp_path)
    trainer.fit()  # steps at progress 0, 0.25, 0.5: the mask froze at 0.5, before the third step
    layers24 = sparse_layers(trainer.model)
    assert len(layers24) == 4 and isinstance(trainer.model.features[0], TernaryConv2d)  # first conv: dense (ASP)
    frozen = [m.weight_quantizer.frozen_mask.clone() for m in layers24]
    assert all(f.shape == m.weight.shape for f, m in zip(frozen, layers24, strict=False))
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["model"]
    saved = [v["frozen_mask"] for k, v in checkpoint.items() if k.endswith("weight_quantizer._extra_state")]
    assert len(saved) == 4 and all(torch.equal(s, f) for s, f in zip(saved, frozen, strict=False))
    # the step after the freeze moved the weights: a mask chosen now would differ somewhere
    assert any(not torch.equal(mask24(m.weight), f) for m, f in zip(layers24, frozen, strict=False))

    rest = compose(["+experiment=mnist_bnn_ternary24", *smoke_overrides, *TINY_RUN, "trainer.max_steps=null",
                    f"trainer.resume={tmp_path}"])
    resumed = Trainer(rest, tmp_path)
    summary = resumed.fit()
    assert summary["steps"] == 4
    for m, f in zip(sparse_layers(resumed.model), frozen, strict=False):
        assert torch.equal(m.weight_quantizer.frozen_mask, f)
        assert bool(((m.quantized_weight() != 0) <= f).all())
    resumed.model.eval()
    packed = pack_model(resumed.model.cpu())
    codes = [m.spec.code for m in packed.modules() if hasattr(m, "spec")]
    assert codes.count("ternary24") == 4 and codes.count("ternary") == 1
