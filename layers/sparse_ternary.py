"""2:4-sparse ternary weights (``ternary24``): TWN with at most 2 nonzeros in every group of 4.

The groups run along each output channel's K = C_in/groups * kh * kw (or in_features) in the order
the native conv engine and the packed format read it (``kernels.sparse24.tap_major``: channels
innermost, so with C_in/groups % 4 == 0 a group is 4 input channels of one tap, NVIDIA ASP's
grouping). A row whose K is not a multiple of 4 ends in a shorter tail group, treated as a group of
4 zero-padded: a tail of 1 or 2 weights is all kept, of 3 the 2 largest.

The schedule follows ASP (train dense, prune 2:4 by magnitude, retrain): before the training
progress reaches ``prune_at`` the layer is plain TWN (``TernaryWeight``); from then on

    M_i = 1[rank_i < 2],  rank_i = #{j in g(i): |W_j| > |W_i|} + #{j in g(i), j < i: |W_j| = |W_i|}
          (the 2 largest |W| of i's group g(i); ties go to the lower index)
    delta = f * sum_i M_i |W_i| / sum_i M_i          (f = threshold_factor = 0.7: TWN's 0.7 E|W|,
                                                      over the weights the mask keeps)
    T_i = sign(W_i) M_i 1[|W_i| > delta],   alpha = sum_i |W_i| |T_i| / sum_i |T_i|

per layer, or per output channel with ``per_channel=True`` (sums over the channel). Every group
then has <= 2 nonzeros, and they are among its 2 largest magnitudes.

Why delta and alpha come after the mask: alpha must (it is the optimal scale for the T actually
used, TWN's mean over survivors). For delta, computing it over the kept weights makes the
threshold depend only on weights the layer can use: with a fixed mask the pruned latent weights
are frozen at their pruning values (their gradient is masked), then moved by weight decay and
momentum, and must not move the threshold; with it, dynamic and fixed masks ternarize the same
kept weights identically. The price is small: on Gaussian weights the relative error
||W - alpha T||^2 / ||W||^2 is 0.267 against 0.262 with TWN's dense delta and 0.258 at the
optimal delta; on Laplace weights 0.292 against 0.312 (dense) and 0.292 (optimal).

``mask``: ``dynamic`` recomputes M from the current W at every forward and passes the gradient
straight through to every latent weight (the STE of Zhou et al. 2021), so pruned weights can grow
back; ``fixed`` freezes M at the first ``set_progress`` with progress >= prune_at (ASP) and keeps it
in ``frozen_mask`` (saved with the model, so a resumed run keeps it); then the forward
uses W * M, so pruned weights get no gradient and stay out of the layer (the latent weights are
not rewritten: nothing reads the pruned values). Until it is frozen a fixed mask acts as a dynamic
one. Backward: straight through, times the estimator's derivative, as TWN; M, delta and alpha
are constants.

Storage: the exported weight uses ``kernels.sparse24``'s packed format (``packed_format``), 4/3
bits per weight; ``bits`` stays 2 (the ternary alphabet; a layer that has not reached ``prune_at``
is dense ternary).
"""
from __future__ import annotations

from dataclasses import replace

import torch

from estimators import Estimator, check_progress
from estimators.base import sign
from kernels.sparse24 import GROUP, from_tap_major, tap_major

from .options import Option
from .quantizers import TernaryWeight

MASK_MODES = ("dynamic", "fixed")


def mask24(w: torch.Tensor) -> torch.Tensor:
    """Bool M shaped like ``w``: the 2 largest |w| of every group of 4 along ``tap_major(w)``'s rows
    (ties to the lower index; a tail group counts as zero-padded to 4)."""
    rows = tap_major(w.detach())
    k = rows.shape[1]
    pad = -k % GROUP
    magnitude = torch.nn.functional.pad(rows.abs(), (0, pad)).reshape(rows.shape[0], -1, GROUP)
    a_i, a_j = magnitude.unsqueeze(-1), magnitude.unsqueeze(-2)  # [.., i, j]
    earlier = torch.ones(GROUP, GROUP, dtype=torch.bool, device=w.device).tril(-1)  # j < i
    rank = ((a_j > a_i) | ((a_j == a_i) & earlier)).sum(-1)
    keep = (rank < 2).reshape(rows.shape[0], -1)[:, :k]
    return from_tap_major(keep, w.shape).contiguous()


class SparseTernary24Weight(TernaryWeight):
    """TWN weights with a 2:4 magnitude mask from ``prune_at`` on (module docstring)."""

    bits = 2
    #: the ``kernels`` format the exported weight and the model summary use
    packed_format = "ternary24"
    options = (replace(TernaryWeight.options[0], doc="delta = threshold_factor * the mean |W| of the weights the "
                       "2:4 mask keeps (of all weights before prune_at)"),
               *TernaryWeight.options[1:],
               Option("mask", str, "dynamic", "the 2:4 mask: recomputed at every forward (dynamic) or frozen at "
                      "prune_at (fixed, as ASP)", choices=MASK_MODES),
               Option("prune_at", float, 0.0, "training progress from which the layer is 2:4 (dense TWN before)",
                      check=lambda v: 0 <= v <= 1, rule="in [0, 1]"))

    def __init__(self, estimator: Estimator, **options):
        super().__init__(estimator, **options)
        # Empty until frozen: the weight's shape is not known here. Saved as the module's extra state,
        # not as a buffer, so that a fresh model's state_dict has the same keys and tensor shapes as
        # one saved after the freeze (checkpoint loaders compare them before loading).
        self.register_buffer("frozen_mask", torch.zeros(0, dtype=torch.bool), persistent=False)
        self._frozen = False  # mirrors frozen_mask.numel() > 0 without a host sync in forward
        self.set_progress(0.0)

    def set_progress(self, progress):
        super().set_progress(progress)
        self.pruned = check_progress(progress) >= self.prune_at
        self._freeze_due = self.mask == "fixed" and self.pruned and not self._frozen

    @torch.no_grad()
    def update_latent_(self, weight):
        """Freeze a fixed mask at the first progress >= prune_at (the latent weight is left as is)."""
        if self._freeze_due:
            self.frozen_mask = mask24(weight)
            self._frozen, self._freeze_due = True, False

    def current_mask(self, w: torch.Tensor) -> torch.Tensor:
        """The 2:4 mask M the forward uses now: the frozen one, else ``mask24(w)``."""
        return self.frozen_mask if self._frozen else mask24(w)

    def project_masked(self, w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """alpha T for the mask M (module docstring)."""
        kept = mask.to(w.dtype)
        magnitude = w.abs() * kept
        delta = self.threshold_factor * self._reduce(magnitude) / self._reduce(kept).clamp(min=1)
        survivors = (magnitude > delta).to(w.dtype)
        alpha = self._reduce(magnitude * survivors) / self._reduce(survivors).clamp(min=1)
        return alpha * sign(w) * survivors

    def forward(self, w):
        if not self.pruned:
            return super().forward(w)
        if self._frozen:
            mask = self.frozen_mask
            return self.estimator.quantize(w * mask.to(w.dtype), lambda v: self.project_masked(v, mask))
        return self.estimator.quantize(w, lambda v: self.project_masked(v, mask24(v)))

    @torch.no_grad()
    def diagnostics(self, w) -> dict:
        """pruned: 1 once the 2:4 mask is on; mask_agreement: the share of the mask's kept positions
        that the current magnitudes would also keep (below 1 only for a frozen mask, as the weights
        move away from the ones it was chosen on)."""
        if not self.pruned:
            return {"pruned": 0.0}
        used = self.current_mask(w)
        return {"pruned": 1.0, "mask_agreement": (used & mask24(w)).sum() / used.sum().clamp(min=1)}

    def get_extra_state(self) -> dict:
        return {"frozen_mask": self.frozen_mask.cpu()}

    def set_extra_state(self, state: dict) -> None:
        self.frozen_mask = state["frozen_mask"].to(device=self.frozen_mask.device, dtype=torch.bool)
        self._frozen = self.frozen_mask.numel() > 0
        self._freeze_due = self.mask == "fixed" and self.pruned and not self._frozen

    def extra_repr(self):
        return f"{super().extra_repr()}, mask={self.mask}, prune_at={self.prune_at:g}"
