"""Every estimator: exact sign forward, backward = upstream * grad(x), grad(x) against an
independent form of its formula, schedules and errors."""
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import estimators

# float64 grid that includes 0, -0.0, the clip points |x| = 1 and points beyond
GRID = torch.cat([torch.linspace(-3, 3, 601, dtype=torch.float64), torch.tensor([0.0, -0.0, 1.0, -1.0], dtype=torch.float64)])


def autograd_derivative(f, x):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(x).sum(), x)
    return g


def reference_grad(name, est, x):
    """Each surrogate written independently of the implementation."""
    if name == "identity":
        return torch.ones_like(x)
    if name == "clipped_ste":
        return torch.tensor([1.0 if abs(v) <= 1 else 0.0 for v in x.tolist()], dtype=x.dtype)
    if name == "approx_sign":
        def F(t):  # Bi-Real's piecewise polynomial
            return torch.where(t < -1, -torch.ones_like(t), torch.where(t < 0, 2 * t + t * t, torch.where(t < 1, 2 * t - t * t, torch.ones_like(t))))
        return autograd_derivative(F, x)
    if name == "swish_sign":
        b = est.beta
        return autograd_derivative(lambda t: 2 * torch.sigmoid(b * t) * (1 + b * t * (1 - torch.sigmoid(b * t))) - 1, x)
    if name == "ede":
        return autograd_derivative(lambda t: est.k * torch.tanh(est.t * t), x)
    if name == "fourier":
        # derivative of the truncated series (4/pi) sum_{i<=n} sin((2i+1) w t)/(2i+1), clipped at |t| <= 1
        s = lambda t: (4 / math.pi) * sum(torch.sin((2 * i + 1) * est.omega * t) / (2 * i + 1) for i in range(est.terms + 1))
        return autograd_derivative(s, x) * (x.abs() <= 1).to(x.dtype)
    raise AssertionError(name)


@pytest.mark.parametrize("name", estimators.NAMES)
@pytest.mark.parametrize("progress", [0.0, 0.37, 1.0])
def test_grad_matches_formula(name, progress):
    est = estimators.get(name)
    est.set_progress(progress)
    torch.testing.assert_close(est.grad(GRID), reference_grad(name, est, GRID), rtol=1e-9, atol=1e-9)


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
    torch.testing.assert_close(x.grad, upstream * est.grad(GRID))


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
    assert all(b - a in (0, 1) for a, b in zip(seen, seen[1:]))
    assert sorted(set(seen)) == list(range(9, 19))
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
