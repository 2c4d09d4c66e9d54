"""DIR-Net (Qin et al. IJCV 2022): the DTE estimator, the IMB weight quantizer and the RBD loss,
each against its formula written independently here (docs/dirnet_notes.md says which parts of
the formulas are verified and which are inferred)."""
import math
from pathlib import Path

import pytest
import torch
import yaml

import estimators
import layers
from estimators.dte import DistributionSensitiveTwoStage
from layers.dirnet import IMBWeight
from layers.irnet import LibraWeight
from qat.rbd import rbd_loss

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# ---------------------------------------------------------------------------------------------
# DTE: d sign/dx := (k t / s) sech^2(t x / s), s = std(x), t = t_min 10^(p log10(t_max/t_min)),
# k = max(1/t, 1); defaults t_min = 0.1, t_max = 10.

X = torch.tensor([-2.0, -1.0, -0.25, 0.0, 0.5, 1.0, 2.0, 3.0], dtype=torch.float64)


def unbiased_std(values):
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def dte_reference(values, t, k, s):
    return [k * t / s / math.cosh(t * v / s) ** 2 for v in values]


# (progress, t, k, stage), worked out by hand from the schedule with t_min = 0.1, t_max = 10
SCHEDULE = [
    (0.0, 0.1, 10.0, 1),
    (0.25, 10 ** -0.5, 10 ** 0.5, 1),
    (0.5, 1.0, 1.0, 2),
    (0.75, 10 ** 0.5, 1.0, 2),
    (1.0, 10.0, 1.0, 2),
]


@pytest.mark.parametrize("progress,t,k,stage", SCHEDULE)
def test_dte_grad_matches_formula_in_both_stages(progress, t, k, stage):
    est = estimators.get("dte")
    est.set_progress(progress)
    assert (est.t, est.k, est.stage) == (pytest.approx(t, rel=1e-12), pytest.approx(k, rel=1e-12), stage)
    s = unbiased_std(X.tolist())
    expected = torch.tensor(dte_reference(X.tolist(), t, k, s), dtype=torch.float64)
    torch.testing.assert_close(est.grad(X), expected, rtol=1e-12, atol=0)
    # backward multiplies the upstream gradient by it; forward is sign with sign(0) = +1
    x = X.clone().requires_grad_(True)
    y = est(x)
    assert y.tolist() == [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    upstream = torch.linspace(-1.0, 2.0, len(X), dtype=torch.float64)
    y.backward(upstream)
    torch.testing.assert_close(x.grad, upstream * expected, rtol=1e-12, atol=0)


def test_dte_hand_values_at_zero():
    """x = [-2, -1, 0, 1, 2]: s = sqrt(10/4); at x = 0, sech^2 = 1 so the value is k t / s."""
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    est = estimators.get("dte")
    assert est.grad(x)[2].item() == pytest.approx(0.6324555320336759, rel=1e-12)  # stage 1: k t = 1
    est.set_progress(1.0)
    assert est.grad(x)[2].item() == pytest.approx(6.324555320336759, rel=1e-12)   # t = 10, k = 1
    # x = 1 at the end: (10 / s) sech^2(10 / s), 10 / s = 6.3245553...
    assert est.grad(x)[3].item() == pytest.approx(6.324555320336759 / math.cosh(6.324555320336759) ** 2, rel=1e-12)


def test_dte_schedule_endpoints_and_stages():
    est = estimators.get("dte", t_min=1e-3, t_max=10.0)
    assert (est.t, est.k, est.stage) == (pytest.approx(1e-3), pytest.approx(1e3), 1)
    est.set_progress(1.0)
    assert (est.t, est.k, est.stage) == (pytest.approx(10.0), 1.0, 2)
    boundary = math.log10(1 / 1e-3) / math.log10(10 / 1e-3)  # t = 1 at p = 3/4
    est.set_progress(boundary)
    assert est.t == pytest.approx(1.0) and est.k == pytest.approx(1.0)
    seen = []
    for step in range(101):
        est.set_progress(step / 100)
        seen.append((est.t, est.k, est.stage))
    assert all(a[0] < b[0] for a, b in zip(seen, seen[1:], strict=False))  # t grows
    assert all(t * k == pytest.approx(1.0) for t, k, stage in seen if stage == 1)
    assert all(k == 1.0 for t, k, stage in seen if stage == 2)
    assert [stage for _, _, stage in seen] == sorted(stage for _, _, stage in seen)  # 1 ... 1 2 ... 2


@pytest.mark.parametrize("progress", [0.0, 0.4, 0.5, 1.0])
def test_dte_without_scale_is_irnet_ede(progress):
    dte, ede = estimators.get("dte", scale="none"), estimators.get("ede")
    dte.set_progress(progress)
    ede.set_progress(progress)
    x = 3.0 * X
    assert torch.equal(dte.grad(x), ede.grad(x))


@pytest.mark.parametrize("progress", [0.0, 1.0])
@pytest.mark.parametrize("c", [0.01, 7.0])
def test_dte_is_distribution_sensitive(progress, c):
    """Measuring x in units of its spread: grad(c x) = grad(x) / c (the surrogate of sign(c x) = sign(x))."""
    est = estimators.get("dte")
    est.set_progress(progress)
    torch.testing.assert_close(est.grad(c * X) * c, est.grad(X), rtol=1e-12, atol=0)


def test_dte_degenerate_spreads_fall_back_to_one():
    est = estimators.get("dte")
    est.set_progress(1.0)
    constant = torch.full((5,), 0.05, dtype=torch.float64)
    torch.testing.assert_close(est.grad(constant),
                               torch.tensor(dte_reference([0.05] * 5, 10.0, 1.0, 1.0), dtype=torch.float64))
    one = torch.tensor([0.05], dtype=torch.float64)
    assert est.grad(one).item() == pytest.approx(dte_reference([0.05], 10.0, 1.0, 1.0)[0], rel=1e-12)
    g = est.grad(torch.tensor([math.nan, math.inf, -math.inf, 0.05], dtype=torch.float64))
    assert math.isnan(g[0].item()) and g[1:3].tolist() == [0.0, 0.0]
    assert g[3].item() == pytest.approx(dte_reference([0.05], 10.0, 1.0, 1.0)[0], rel=1e-12)


def test_dte_keeps_its_tail_in_float32():
    est = estimators.get("dte")
    est.set_progress(1.0)
    x = torch.cat([torch.linspace(-4.0, 4.0, 81)])
    s = unbiased_std(x.double().tolist())
    expected = torch.tensor(dte_reference(x.double().tolist(), 10.0, 1.0, s), dtype=torch.float64)
    g = est.grad(x)
    assert (g > 0).all()  # 1 - tanh^2 would be exactly 0 in float32 beyond |t x / s| ~ 9
    torch.testing.assert_close(g.double(), expected, rtol=2e-5, atol=0)


@pytest.mark.parametrize("kwargs,needle", [
    ({"t_min": 0.0}, "t_min"),
    ({"t_min": 1.0, "t_max": 0.5}, "t_max"),
    ({"scale": "mad"}, "scale"),
])
def test_dte_bad_hyperparameters_raise(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        estimators.get("dte", **kwargs)


def test_dte_is_registered_and_its_config_builds_it():
    config = yaml.safe_load((CONFIGS / "estimator" / "dte.yaml").read_text())
    est = estimators.get(config)
    assert isinstance(est, DistributionSensitiveTwoStage) and "dte" in estimators.NAMES
    assert est.hyperparameters() == {"t_min": 0.1, "t_max": 10.0, "scale": "std", "t": 0.1, "k": 10.0}
    assert est.needs == "value" and est.scheduled


# ---------------------------------------------------------------------------------------------
# IMB: w^_c = (W_c - mean W_c) / std(W_c - mean W_c) (unbiased), Q = sign(w^_c) 2^{round(log2 mean|w^_c|)}

def reference_balanced(w):
    """The standardisation written with torch.std, differentiable (float64)."""
    dims = tuple(range(1, w.dim()))
    centered = w - w.mean(dim=dims, keepdim=True)
    return centered / centered.std(dim=dims, keepdim=True)


def weights(shape=(6, 3, 3, 3), seed=0):
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=generator, dtype=torch.float64) * 0.05 + 0.01
    flat = w.view(shape[0], -1)
    flat[1] = 0.0  # a heavy-tailed filter: two spikes in zeros, mean|w^| = 2 a' / n -> s_c = -2
    flat[1, 0], flat[1, 1] = 0.3, -0.3
    flat[2] = torch.rand(flat.shape[1], generator=generator, dtype=torch.float64) ** 6  # skewed
    return w


@pytest.mark.parametrize("shape", [(6, 3, 3, 3), (6, 20)])
def test_imb_balanced_weights_have_zero_mean_and_unit_std(shape):
    b = IMBWeight.standardize(weights(shape))
    rows = b.flatten(1)
    torch.testing.assert_close(rows.mean(dim=1), torch.zeros(shape[0], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(rows.std(dim=1), torch.ones(shape[0], dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(b, reference_balanced(weights(shape)), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("shape", [(6, 3, 3, 3), (6, 20)])
def test_imb_output_is_plus_minus_a_power_of_two_per_channel(shape):
    w = weights(shape)
    q = IMBWeight(estimators.get("dte"))
    out = q(w).detach().flatten(1)
    balanced = reference_balanced(w).flatten(1)
    for c in range(shape[0]):
        exponent = round(math.log2(balanced[c].abs().mean().item()))
        assert set(out[c].abs().tolist()) == {2.0 ** exponent}, c
        assert torch.equal(out[c] > 0, balanced[c] >= 0), c
    n = w[0].numel()
    # filter 1: +-a, zeros otherwise -> w^ = +-sqrt((n - 1) / 2), 0 -> mean|w^| = sqrt(2 (n - 1)) / n
    assert round(math.log2(math.sqrt(2 * (n - 1)) / n)) == -2
    assert out[1].abs().max().item() == 2.0 ** round(math.log2(math.sqrt(2 * (n - 1)) / n))
    code, scale = q.factors(w)
    assert scale.shape == (shape[0],) + (1,) * (len(shape) - 1)
    assert set(code.detach().unique().tolist()) == {-1.0, 1.0}
    assert q.bits == 1 and not q.is_plain_sign and q.scale_count(w) == shape[0]


@pytest.mark.parametrize("progress", [0.0, 1.0])
@pytest.mark.parametrize("shape", [(6, 3, 3, 3), (6, 20)])
def test_imb_gradient_flows_through_the_standardisation(shape, progress):
    """The quantizer's gradient equals autograd through the formula with sign replaced by DTE's
    surrogate k tanh(t w^ / s) (s a constant), and 2^{s_c} a constant."""
    est = estimators.get("dte")
    est.set_progress(progress)
    q = IMBWeight(est)
    w = weights(shape).requires_grad_(True)
    upstream = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    q(w).backward(upstream)

    w_ref = weights(shape).requires_grad_(True)
    balanced = reference_balanced(w_ref)
    s = balanced.detach().std()
    scale = torch.exp2(torch.round(torch.log2(
        balanced.detach().abs().mean(dim=tuple(range(1, len(shape))), keepdim=True))))
    (scale * est.k * torch.tanh(est.t * balanced / s)).backward(upstream)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-10, atol=1e-12)

    # and it is not the gradient with the mean and std held constant
    w_detached = weights(shape).requires_grad_(True)
    dims = tuple(range(1, len(shape)))
    centered = w_detached - w_detached.mean(dim=dims, keepdim=True).detach()
    balanced_d = centered / centered.detach().std(dim=dims, keepdim=True)
    (scale * est.k * torch.tanh(est.t * balanced_d / s)).backward(upstream)
    assert not torch.allclose(w.grad, w_detached.grad, rtol=1e-3, atol=1e-6)
    # the standardisation's gradient is orthogonal to the constant and to w^ in each filter
    rows = w.grad.flatten(1)
    torch.testing.assert_close(rows.sum(dim=1), torch.zeros(shape[0], dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close((rows * balanced.detach().flatten(1)).sum(dim=1),
                               torch.zeros(shape[0], dtype=torch.float64), rtol=0, atol=1e-10)


def test_imb_zero_variance_filters_stay_finite():
    w = weights((4, 5)).clone()
    w[0] = 0.0
    w[3] = 0.25
    w.requires_grad_(True)
    q = IMBWeight(estimators.get("dte"))
    out = q(w)
    assert out[0].tolist() == [0.0] * 5 and out[3].tolist() == [0.0] * 5  # w^ = 0, 2^{log2 0} = 0
    out.sum().backward()
    assert torch.isfinite(w.grad).all()


def test_imb_is_libra_pb():
    """IMB = IR-Net's Libra-PB (the inferred reading): the same values and gradients."""
    w = weights().requires_grad_(True)
    w_libra = weights().requires_grad_(True)
    upstream = torch.randn(w.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    IMBWeight(estimators.get("dte"))(w).backward(upstream)
    LibraWeight(estimators.get("dte"))(w_libra).backward(upstream)
    assert isinstance(IMBWeight(estimators.get("dte")), LibraWeight)
    assert torch.equal(w.grad, w_libra.grad)


@pytest.mark.parametrize("float_type", [torch.nn.Conv2d, torch.nn.Linear])
def test_dirnet_row_builds_imb_weights_sign_inputs_and_dte(float_type):
    spec = layers.METHODS["dirnet"]
    assert (spec.weight_bits, spec.input_bits, spec.default_estimator) == (1, 1, "dte")
    assert spec.clip_latent is None and spec.latent_weight_decay and layers.weights_only_method("dirnet") == "irnet_w"
    cls = layers.LAYER_CLASSES[("dirnet", float_type)]
    torch.manual_seed(0)
    layer = cls(6, 5, 3, padding=1, bias=False) if float_type is torch.nn.Conv2d else cls(6, 5, bias=False)
    assert isinstance(layer.weight_quantizer, IMBWeight)
    assert isinstance(layer.input_quantizer, layers.quantizers.SignActivation)
    assert layer.weight_quantizer.estimator.name == layer.input_quantizer.estimator.name == "dte"
    x = torch.randn((2, 6, 4, 4) if float_type is torch.nn.Conv2d else (2, 6))
    expected = layer.float_op(torch.where(x >= 0, 1.0, -1.0), layer.weight_quantizer(layer.weight).detach(), None)
    torch.testing.assert_close(layer(x).detach(), expected, rtol=1e-6, atol=1e-6)
    config = yaml.safe_load((CONFIGS / "quant" / "dirnet.yaml").read_text())
    assert config["method"] == "dirnet" and config["estimator"] is None


# ---------------------------------------------------------------------------------------------
# RBD: sum_j mean_n || S_n / ||S_n|| - T_n / ||T_n|| ||^2

def test_rbd_loss_matches_a_hand_computation():
    # layer 0, sample 0: (3, 4)/5 - (4, 3)/5 = (-0.2, 0.2) -> 0.08; sample 1: (1, 0) - (0, 1) -> 2
    s0 = torch.tensor([[3.0, 4.0], [1.0, 0.0]]).view(2, 2, 1, 1)
    t0 = torch.tensor([[4.0, 3.0], [0.0, 2.0]]).view(2, 2, 1, 1)
    # layer 1, one sample: (1, 0, 0) vs (-1, 0, 0) -> 4
    s1, t1 = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[-5.0, 0.0, 0.0]])
    loss = rbd_loss([s0, s1], [t0, t1])
    assert loss.item() == pytest.approx((0.08 + 2.0) / 2 + 4.0, rel=1e-6)
    assert rbd_loss({"b": s1, "a": s0}, {"a": t0, "b": t1}).item() == pytest.approx(loss.item(), rel=1e-7)


def test_rbd_loss_gradient_and_invariances():
    generator = torch.Generator().manual_seed(3)
    s = torch.randn(4, 3, 5, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 3, 5, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    loss = rbd_loss([s], [t])
    # against an independent form: 2 - 2 cos(S_n, T_n), averaged over the batch
    cos = torch.nn.functional.cosine_similarity(s.detach().flatten(1), t.detach().flatten(1), dim=1)
    assert loss.item() == pytest.approx((2 - 2 * cos).mean().item(), rel=1e-12)
    loss.backward()
    assert t.grad is None and s.grad is not None  # the teacher is detached
    s_ref = s.detach().clone().requires_grad_(True)
    flat_s, flat_t = s_ref.flatten(1), t.detach().flatten(1)
    ref = ((flat_s / flat_s.norm(dim=1, keepdim=True) - flat_t / flat_t.norm(dim=1, keepdim=True)) ** 2).sum(1).mean()
    ref.backward()
    torch.testing.assert_close(s.grad, s_ref.grad, rtol=1e-10, atol=1e-14)
    # only directions count: positive per-sample scales change nothing, equal directions give 0
    scales = torch.tensor([0.01, 1.0, 7.0, 300.0], dtype=torch.float64).view(4, 1, 1, 1)
    assert rbd_loss([s * scales], [t]).item() == pytest.approx(loss.item(), rel=1e-12)
    assert rbd_loss([s], [3.0 * s]).item() == pytest.approx(0.0, abs=1e-12)
    assert rbd_loss([s], [t], detach_teacher=False).requires_grad
    half = rbd_loss([s.detach().half()], [t.detach().half()])
    assert half.dtype == torch.float32 and half.item() == pytest.approx(loss.item(), rel=1e-2)


@pytest.mark.parametrize("student,teacher,needle", [
    ([torch.zeros(2, 3)], [torch.zeros(2, 4)], "shape"),
    ([torch.zeros(2, 3)], [torch.zeros(2, 3), torch.zeros(2, 3)], "2 teacher"),
    ({"a": torch.zeros(2, 3)}, {"b": torch.zeros(2, 3)}, "differ"),
    ({"a": torch.zeros(2, 3)}, [torch.zeros(2, 3)], "both"),
    ([], [], "no feature maps"),
    ([torch.zeros(3)], [torch.zeros(3)], "at least 2 dims"),
])
def test_rbd_loss_rejects_mismatched_features(student, teacher, needle):
    with pytest.raises(ValueError, match=needle):
        rbd_loss(student, teacher)
