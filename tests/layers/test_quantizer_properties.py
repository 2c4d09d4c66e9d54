"""Hypothesis property tests of the quantizers' value sets and scale invariances."""
import numpy as np
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from estimators import get
from layers import quantizers

weights = arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(1, 20)),
                 elements=st.floats(-10, 10, allow_nan=False, allow_subnormal=False))


@settings(max_examples=80, deadline=None)
@given(w=weights)
def test_bwn_values_are_plus_minus_channel_mean(w):
    w = torch.from_numpy(w)
    q = quantizers.ScaledSignWeight(get("identity"))(w)
    alpha = w.abs().mean(dim=1, keepdim=True)
    assert torch.equal(q.abs(), alpha.expand_as(q))
    assert torch.equal(q >= 0, w >= 0)


@settings(max_examples=80, deadline=None)
@given(w=weights, factor=st.floats(0.0, 1.5))
def test_ternary_has_three_levels_and_is_scale_equivariant(w, factor):
    w = torch.from_numpy(w)
    # An entry within rounding of the threshold is kept or not depending on the order of the sum
    # (here, in the layer, and for 3 w): the properties are claimed away from such ties.
    delta = factor * w.abs().mean()
    assume(delta == 0 or not torch.any((w.abs() - delta).abs() <= 1e-12 * delta))
    quantizer = quantizers.TernaryWeight(get("identity"), threshold_factor=factor)
    q = quantizer(w)
    levels = q.abs().unique()
    assert len(levels) <= 2 and (levels.numel() == 1 or levels[0] == 0)
    assert torch.all((q == 0) | (torch.sign(q) == torch.sign(w)))
    # survivors are exactly the entries above the threshold, all at alpha = their mean magnitude
    kept = w.abs() > delta
    assert torch.equal(q != 0, kept)
    if kept.any():
        torch.testing.assert_close(q[kept], w[kept].abs().mean() * torch.sign(w[kept]))
    torch.testing.assert_close(quantizer(3.0 * w), 3.0 * q)


@settings(max_examples=60, deadline=None)
@given(w=weights, sparsity=st.floats(0.0, 0.95))
@example(w=np.array([[5.19850512e-13], [1.0]]), sparsity=0.5)   # a row under the 1e-12 norm clamp (found in CI)
def test_hq_filters_are_unit_ternary_and_scale_invariant(w, sparsity):
    w = torch.from_numpy(w)
    quantizer = quantizers.HypersphericalTernaryWeight(get("identity"), target_sparsity=sparsity, prune_end=0.5)
    quantizer.set_progress(1.0)
    q = quantizer(w)
    nonzero_rows = w.abs().sum(dim=1) > 0
    for row, keep in zip(q, nonzero_rows, strict=True):
        if keep and row.abs().sum() > 0:
            k = (row != 0).sum()
            torch.testing.assert_close(row[row != 0].abs(),
                                       torch.full((int(k),), float(1 / k.double().sqrt()), dtype=w.dtype))
    assert (q == 0).sum() >= int(sparsity * w.numel())
    # the zeros are exactly the entries at or below the floor(s N)-th smallest |w^| of the layer
    norms = w.norm(dim=1, keepdim=True)
    unit = w / norms.clamp(min=1e-12)
    pruned = int(sparsity * w.numel())
    delta = unit.abs().flatten().sort().values[pruned - 1] if pruned else -1.0
    assert torch.equal(q == 0, unit.abs() <= delta)
    # scale invariance holds where the quantizer divides by the true norm: a nonzero row whose norm is
    # under its 1e-12 clamp is not scaled to unit length, and 5x the row may no longer be under it
    if torch.all((norms == 0) | (norms >= 1e-12)):
        torch.testing.assert_close(quantizer(5.0 * w), q)
