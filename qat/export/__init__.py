"""Packed inference models (see ``qat.export.packed``) and their command line
(``python -m qat.export <run dir or checkpoint> --out model.safetensors [--benchmark]``)."""
from .batching import BatchSlices
from .chains import fuse_binary_chains
from .packed import (
    FORMAT,
    PackedConv2d,
    PackedEmbedding,
    PackedLayer,
    PackedLinear,
    PackedSpec,
    load_packed,
    pack_model,
    read_packed,
    save_packed,
)
from .timing import time_inference

__all__ = ["FORMAT", "PackedSpec", "PackedLayer", "PackedConv2d", "PackedLinear", "PackedEmbedding", "pack_model",
           "save_packed", "load_packed", "read_packed", "fuse_binary_chains", "BatchSlices",
           "time_inference"]
