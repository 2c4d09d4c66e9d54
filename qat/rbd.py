"""DIR-Net's Representation-align Binarization-aware Distillation (RBD) loss, as a pure function.

Verified (abstract, arXiv 2109.12338 v2 / IJCV 2022): RBD retains "the representation information
by distilling the representations between full-precision and binarized networks". The paper's
loss was not available (``docs/dirnet_notes.md``); the form below is the inferred reading [I]:
align the *directions* of the float teacher's and the binary student's representations, which
differ in scale (a binary layer's output is an integer sum times a power of two), as attention
transfer and Real-to-Binary do for BNNs.

The trainer's distillation (``qat/train/distill.py``) collects the feature maps at the distilled
layers of both networks for the same batch and adds ``weight * rbd_loss(student, teacher)`` to the
task loss.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F


def _pairs(student, teacher) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(label, student map, teacher map) for lists (matched by position) or dicts (by name)."""
    if isinstance(student, Mapping) != isinstance(teacher, Mapping):
        raise ValueError("rbd_loss: student and teacher features must both be sequences or both mappings, "
                         f"got {type(student).__name__} and {type(teacher).__name__}")
    if isinstance(student, Mapping):
        if set(student) != set(teacher):
            raise ValueError(f"rbd_loss: student layers {sorted(student)} and teacher layers {sorted(teacher)} differ")
        pairs = [(str(name), student[name], teacher[name]) for name in student]
    else:
        if not isinstance(student, Sequence) or not isinstance(teacher, Sequence):
            raise ValueError(f"rbd_loss: features must be sequences or mappings of tensors, "
                             f"got {type(student).__name__}")
        if len(student) != len(teacher):
            raise ValueError(f"rbd_loss: {len(student)} student feature maps but {len(teacher)} teacher feature maps")
        pairs = [(f"#{i}", s, t) for i, (s, t) in enumerate(zip(student, teacher, strict=False))]
    if not pairs:
        raise ValueError("rbd_loss: no feature maps given")
    for label, s, t in pairs:
        if s.shape != t.shape or s.dim() < 2:
            raise ValueError(f"rbd_loss: feature map {label}: student shape {tuple(s.shape)} and teacher shape "
                             f"{tuple(t.shape)} must be equal and [N, ...] with at least 2 dims")
    return pairs


def normalized_representation(f: torch.Tensor) -> torch.Tensor:
    """f_n / ||f_n||_2 for each sample n, f flattened to [N, D] (in float32 at least; a zero map stays 0)."""
    flat = f.flatten(1)
    return F.normalize(flat.to(torch.promote_types(flat.dtype, torch.float32)), p=2.0, dim=1, eps=1e-12)


def rbd_loss(student, teacher, *, detach_teacher: bool = True) -> torch.Tensor:
    """RBD between the binary student's and the float teacher's representations at J layers,

        L_RBD = sum_{j=1..J} (1/N) sum_{n=1..N} || S_n^j / ||S_n^j||_2 - T_n^j / ||T_n^j||_2 ||_2^2,

    S_n^j, T_n^j the flattened feature maps of sample n at layer j (any shape [N, ...], equal for
    student and teacher). Each term is 2 - 2 cos(S_n^j, T_n^j), in [0, 4]. ``student`` and
    ``teacher`` are sequences (matched by position) or mappings (matched by layer name). The
    teacher is detached by default (a fixed float network). Returns a 0-dim tensor (float32 at
    least).

    Inferred [I], not the paper's verified equation: per-sample L2 normalisation of the whole
    flattened map (not per channel or an attention map), the squared distance, the sum over layers
    and the mean over the batch.
    """
    total = None
    for _, s, t in _pairs(student, teacher):
        if detach_teacher:
            t = t.detach()
        term = (normalized_representation(s) - normalized_representation(t)).pow(2).sum(dim=1).mean()
        total = term if total is None else total + term
    return total
