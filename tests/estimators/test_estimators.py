"""Every estimator: exact sign forward, backward = upstream * grad(x), grad(x) against an
independent form of its formula, schedules and errors."""
import math
from itertools import pairwise

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import estimators

# float64 grid that includes 0, -0.0, the clip points |x| = 1 and points beyond
GRID = torch.cat([torch.linspace(-3, 3, 601, dtype=torch.float64),
                  torch.tensor([0.0, -0.0, 1.0, -1.0], dtype=torch.float64)])


def autograd_derivative(f, x):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(x).sum(), x)
    return g


# The defaults, as the papers give them (reference/algorithms.md §3, §6, §7): the references below
# use these numbers and their own schedules, never the estimator's state.
BETA = 5.0  # SwishSign (BNN+, Larq)
T_MIN, T_MAX = 0.1, 10.0  # EDE (IR-Net)
N_S, N_P, OMEGA, CLIP = 9, 18, 0.1, 1.0  # Fourier (FDA; omega and clip from BiBench)


def ede_t_k(p):
    """IR-Net: t = T_min 10^(p log10(T_max / T_min)), k = max(1/t, 1)."""
    t = T_MIN * 10 ** (p * math.log10(T_MAX / T_MIN))
    return t, max(1 / t, 1.0)


def fourier_terms(p):
    """n goes from n_s to n_p = 2 n_s, every value an equal share of training (the documented rule)."""
    return min(N_P, N_S + math.floor((N_P - N_S + 1) * p))


def reference_grad(name, progress, x):
    """Each surrogate written independently of the implementation, at the default hyperparameters."""
    if name == "identity":
        return torch.ones_like(x)
    if name == "clipped_ste":
        return torch.tensor([1.0 if abs(v) <= 1 else 0.0 for v in x.tolist()], dtype=x.dtype)
    if name == "approx_sign":
        def F(t):  # Bi-Real's piecewise polynomial
            return torch.where(t < -1, -torch.ones_like(t),
                               torch.where(t < 0, 2 * t + t * t, torch.where(t < 1, 2 * t - t * t, torch.ones_like(t))))
        return autograd_derivative(F, x)
    if name == "swish_sign":
        b = BETA
        return autograd_derivative(lambda t: 2 * torch.sigmoid(b * t) * (1 + b * t * (1 - torch.sigmoid(b * t))) - 1, x)
    if name == "ede":
        t_, k = ede_t_k(progress)
        return autograd_derivative(lambda t: k * torch.tanh(t_ * t), x)
    if name == "dte":  # DIR-Net (inferred form): k tanh(t x / s), s = unbiased std of the whole tensor
        t_, k = ede_t_k(progress)
        s = x.std().item()
        return autograd_derivative(lambda t: k * torch.tanh(t_ * t / s), x)
    if name == "fourier":
        # derivative of the truncated series (4/pi) sum_{i<=n} sin((2i+1) w t)/(2i+1), clipped at |t| <= 1
        n = fourier_terms(progress)

        def series(t):
            return (4 / math.pi) * sum(torch.sin((2 * i + 1) * OMEGA * t) / (2 * i + 1) for i in range(n + 1))

        return autograd_derivative(series, x) * (x.abs() <= CLIP).to(x.dtype)
    raise AssertionError(name)


@pytest.mark.parametrize("name", estimators.NAMES)
@pytest.mark.parametrize("progress", [0.0, 0.37, 1.0])
def test_grad_matches_formula(name, progress):
    est = estimators.get(name)
    est.set_progress(progress)
    torch.testing.assert_close(est.grad(GRID), reference_grad(name, progress, GRID), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", estimators.NAMES)
def test_forward_is_exact_sign_and_backward_multiplies(name):
    est = estimators.get(name)
    x = GRID.clone().requires_grad_(True)
    y = est(x)
    expected = torch.tensor([1.0 if v >= 0 else -1.0 for v in GRID.tolist()], dtype=torch.float64)
    assert torch.equal(y.detach(), expected)
    assert set(y.detach().unique().tolist()) == {-1.0, 1.0}
    assert y[-4].item() == 1.0 and y[-3].item() == 1.0  # sign(0) = sign(-0.0) = +1
    upstream = torch.randn_like(GRID)
    y.backward(upstream)
    torch.testing.assert_close(x.grad, upstream * reference_grad(name, 0.0, GRID), rtol=1e-9, atol=1e-9)


def test_clipped_ste_boundary_is_inclusive():
    g = estimators.get("clipped_ste").grad(torch.tensor([-1.0, 1.0, 1.0000001, -1.0000001], dtype=torch.float64))
    assert g.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_ede_schedule():
    est = estimators.get("ede", t_min=0.1, t_max=10)
    assert (est.t, est.k) == pytest.approx((0.1, 10.0))
    est.set_progress(0.5)
    assert est.t == pytest.approx(1.0) and est.k == pytest.approx(1.0)
    est.set_progress(1.0)
    assert est.t == pytest.approx(10.0) and est.k == 1.0
    est.set_progress(0.25)
    assert est.t == pytest.approx(0.1 * 10 ** 0.5) and est.k == pytest.approx(1 / est.t)


def test_fourier_terms_schedule_goes_from_n_s_to_n_p():
    est = estimators.get("fourier", terms=9)
    seen = []
    for step in range(101):
        est.set_progress(step / 100)
        seen.append(est.terms)
    assert seen[0] == 9 and seen[-1] == 18
    assert all(b - a in (0, 1) for a, b in pairwise(seen))
    assert sorted(set(seen)) == list(range(9, 19))
    assert seen == [fourier_terms(step / 100) for step in range(101)]
    assert [seen.count(n) for n in range(9, 18)] == [10] * 9  # equal shares (n_p from p = 0.9 on)
    fixed = estimators.get("fourier", terms=5, max_terms=5)
    fixed.set_progress(1.0)
    assert fixed.terms == 5


def test_fourier_value_table_from_reference():
    # reference/algorithms.md, FDA gotchas: omega = 0.1
    est = estimators.get("fourier", terms=9, max_terms=9)
    g = est.grad(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert g[0].item() == pytest.approx(1.27, abs=0.005) and g[1].item() == pytest.approx(0.58, abs=0.005)
    late = estimators.get("fourier", terms=18, max_terms=18)
    assert late.grad(torch.tensor([1.0], dtype=torch.float64)).item() == pytest.approx(-0.39, abs=0.01)


@settings(max_examples=60, deadline=None)
@given(x=st.floats(-1, 1, allow_nan=False), n=st.integers(1, 30), omega=st.floats(0.01, 1.5))
@example(x=5e-324, n=1, omega=1.5)  # subnormal input: found by hypothesis in CI
@example(x=-1e-310, n=30, omega=0.01)
def test_fourier_closed_form_equals_cosine_sum(x, n, omega):
    est = estimators.get("fourier", terms=n, max_terms=n, omega=omega)
    t = torch.tensor([x], dtype=torch.float64)
    assert est.grad(t.float()).item() == pytest.approx(est.grad(t).item(), rel=1e-4, abs=1e-4)
    direct = (4 * omega / math.pi) * sum(math.cos((2 * i + 1) * omega * x) for i in range(n + 1))
    assert est.grad(t).item() == pytest.approx(direct, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("name,kwargs,needle", [
    ("nope", {}, "nope"),
    ("fourier", {"terms": 0}, "terms"),
    ("fourier", {"omega": 0.0}, "omega"),
    ("fourier", {"omega": -1.0}, "omega"),
    ("swish_sign", {"beta": 0.0}, "beta"),
    ("ede", {"t_min": 0.0}, "t_min"),
    ("ede", {"t_min": 1.0, "t_max": 0.5}, "t_max"),
    ("identity", {"beta": 2.0}, "beta"),
])
def test_bad_names_and_hyperparameters_raise(name, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        estimators.get(name, **kwargs)


def test_unknown_name_lists_valid_choices():
    with pytest.raises(ValueError) as info:
        estimators.get("fourrier")
    assert all(n in str(info.value) for n in estimators.NAMES)


def test_get_accepts_mapping_and_object():
    est = estimators.get({"name": "swish_sign", "beta": 3.0})
    assert isinstance(est, estimators.SwishSign) and est.beta == 3.0
    assert estimators.get(est) is est


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_progress_out_of_range(p):
    with pytest.raises(ValueError, match="progress"):
        estimators.get("ede").set_progress(p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_clipped_ste_fused_backward_is_inclusive_in_every_dtype(dtype):
    est = estimators.get("clipped_ste")
    one = torch.tensor(1.0, dtype=dtype)
    above = torch.nextafter(one, torch.tensor(2.0, dtype=dtype))
    below = torch.nextafter(one, torch.tensor(0.0, dtype=dtype))
    x = torch.stack([one, -one, above, -above, below, -below, torch.tensor(0.0, dtype=dtype)]).requires_grad_(True)
    est(x).backward(torch.full_like(x, 3.0))
    assert x.grad.tolist() == [3.0, 3.0, 0.0, 0.0, 3.0, 3.0, 3.0]
    assert torch.equal(x.grad, 3.0 * est.grad(x.detach()).to(dtype))


def swish_reference(beta, v):
    """The README / Larq form beta (2 - beta x tanh(beta x / 2)) / (1 + cosh(beta x)) in float64 math."""
    return beta * (2 - beta * v * math.tanh(beta * v / 2)) / (1 + math.cosh(beta * v))


def ede_reference(t, k, v):
    """k t (1 - tanh^2(t x)) = k t / cosh^2(t x) in float64 math (cosh does not cancel)."""
    return k * t / math.cosh(t * v) ** 2


def test_swish_sign_keeps_its_tail_in_float32():
    """1 - tanh^2 is exactly 0 in float32 beyond |x| = 1.8 at beta = 10; the tail is ~1e-19 at 5."""
    est = estimators.get("swish_sign", beta=10.0)
    x = torch.cat([torch.linspace(1.81, 5.0, 60), -torch.linspace(1.81, 5.0, 60)])
    g = est.grad(x)
    expected = torch.tensor([swish_reference(10.0, v) for v in x.double().tolist()], dtype=torch.float64)
    assert (g != 0).all() and torch.equal(g < 0, expected < 0)
    torch.testing.assert_close(g.double(), expected, rtol=2e-5, atol=0)
    # the backward multiplies the same values
    xr = x.clone().requires_grad_(True)
    est(xr).backward(torch.ones_like(x))
    assert torch.equal(xr.grad, g)


def test_ede_keeps_its_tail_in_float32():
    """At the end of training (t = 10) 1 - tanh^2(t x) is exactly 0 in float32 beyond |x| = 0.9."""
    est = estimators.get("ede")
    est.set_progress(1.0)
    t, k = ede_t_k(1.0)
    x = torch.cat([torch.linspace(0.91, 4.3, 60), -torch.linspace(0.91, 4.3, 60)])  # |t x| <= 43: normal floats
    g = est.grad(x)
    expected = torch.tensor([ede_reference(t, k, v) for v in x.double().tolist()], dtype=torch.float64)
    assert (g > 0).all()
    torch.testing.assert_close(g.double(), expected, rtol=2e-5, atol=0)
    # stage 1 (t = 0.1, k = 10) too, and float64 far into the tail
    est.set_progress(0.0)
    expected = torch.tensor([ede_reference(*ede_t_k(0.0), v) for v in x.double().tolist()], dtype=torch.float64)
    torch.testing.assert_close(est.grad(x).double(), expected, rtol=2e-5, atol=0)
    est.set_progress(1.0)
    x64 = torch.linspace(2.0, 30.0, 50, dtype=torch.float64)
    expected = torch.tensor([ede_reference(t, k, v) for v in x64.tolist()], dtype=torch.float64)
    torch.testing.assert_close(est.grad(x64), expected, rtol=1e-12, atol=0)


NON_FINITE = torch.tensor([math.nan, math.inf, -math.inf, 0.5, -2.0])


@pytest.mark.parametrize("clip", [1.0, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fourier_non_finite_inputs_one_documented_behaviour(clip, dtype):
    """NaN -> NaN (propagates), +-inf -> 0, with and without clipping; the backward agrees."""
    est = estimators.get("fourier", clip=clip)
    x = NON_FINITE.to(dtype)
    g = est.grad(x)
    assert math.isnan(g[0].item())
    assert g[1:3].tolist() == [0.0, 0.0]
    n = N_S

    def direct(v):
        return (4 * OMEGA / math.pi) * sum(math.cos((2 * i + 1) * OMEGA * v) for i in range(n + 1))

    assert g[3].item() == pytest.approx(direct(0.5), rel=1e-6)
    assert g[4].item() == (0.0 if clip is not None else pytest.approx(direct(-2.0), rel=1e-6))
    xr = x.clone().requires_grad_(True)
    est(xr).backward(torch.ones_like(x))
    torch.testing.assert_close(xr.grad, g, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["swish_sign", "ede", "approx_sign"])
def test_smooth_estimators_non_finite_inputs(name):
    """The same convention for the decaying surrogates: NaN -> NaN, +-inf -> their limit 0."""
    est = estimators.get(name)
    est.set_progress(1.0)
    g = est.grad(NON_FINITE[:3])
    assert math.isnan(g[0].item()) and g[1:].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", [n for n in estimators.NAMES if estimators.get(n).needs == "zeros"])
def test_zeros_comparison_states_zeros_exactly(name, dtype):
    """Where an estimator states Z as one comparison, that comparison is zeros(x), at the clip points
    and one ulp either side of them, +-0 and NaN included."""
    import operator

    est = estimators.get(name)
    rule = est.zeros_comparison(dtype)
    assert rule is not None, f"{name}: a zeros estimator without a one-comparison form"
    op, threshold, absolute = rule
    x = torch.cat([GRID, torch.tensor([float("nan"), 1 + 1e-7, -1 - 1e-7, 1 - 1e-7])]).to(dtype)
    x = torch.cat([x, torch.nextafter(x, torch.tensor(math.inf, dtype=dtype)), torch.nextafter(x, -x.abs() - 1)])
    compare = {"lt": operator.lt, "le": operator.le, "ge": operator.ge}[op]
    assert torch.equal(compare(x.abs() if absolute else x, threshold), est.zeros(x))
