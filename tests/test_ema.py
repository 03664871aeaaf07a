"""common.ema: weight EMA built on torch's AveragedModel."""

from __future__ import annotations

import pytest
import torch

from common.ema import make_ema


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)).double()


def _fill(model: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
        for b in model.buffers():
            if b.is_floating_point():
                b.fill_(value)


def _float_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()]


def test_ema_is_a_frozen_copy():
    model = _model()
    ema = make_ema(model, decay=0.9)
    assert all(not p.requires_grad for p in ema.parameters())
    assert all(p.requires_grad for p in model.parameters())
    for a, b in zip(_float_tensors(ema.module), _float_tensors(model), strict=True):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()  # same values, own storage


def test_first_update_copies_the_weights():
    model = _model()
    ema = make_ema(model, decay=0.99)
    _fill(model, 5.0)  # move the model away from the copy made at construction
    ema.update_parameters(model)
    assert int(ema.n_averaged) == 1
    for t in _float_tensors(ema.module):
        assert (t == 5.0).all()


def test_ema_of_a_constant_stays_constant():
    model = _model()
    _fill(model, 0.7)
    ema = make_ema(model, decay=0.9)
    for _ in range(50):
        ema.update_parameters(model)
    assert int(ema.n_averaged) == 50
    for t in _float_tensors(ema.module):
        torch.testing.assert_close(t, torch.full_like(t, 0.7), rtol=0, atol=1e-15)


@pytest.mark.parametrize("decay", [0.5, 0.9, 0.999])
def test_ema_converges_to_a_new_constant_at_rate_decay_pow_n(decay):
    old, new = 1.0, 3.0
    model = _model()
    _fill(model, old)
    ema = make_ema(model, decay=decay)
    ema.update_parameters(model)  # the first update copies: ema == old
    _fill(model, new)
    for n in range(1, 31):
        ema.update_parameters(model)
        expected = new + decay**n * (old - new)
        for t in _float_tensors(ema.module):  # parameters and BatchNorm running statistics alike
            torch.testing.assert_close(t, torch.full_like(t, expected), rtol=1e-12, atol=1e-12)
    for t in _float_tensors(model):  # the model itself is never touched
        assert (t == new).all()


def test_ema_module_computes_with_averaged_weights():
    model = _model().eval()
    ema = make_ema(model, decay=0.5)
    ema.update_parameters(model)
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ema(x), model(x), rtol=0, atol=0)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update_parameters(model)  # halfway between the two weights
    torch.testing.assert_close(ema.module[0].weight, model[0].weight - 0.5)


def test_warmup_forgets_the_initial_weights():
    old, new, decay = 0.0, 1.0, 0.999
    model = _model()
    _fill(model, old)
    plain, warm = make_ema(model, decay), make_ema(model, decay, warmup=True)
    plain.update_parameters(model)
    warm.update_parameters(model)
    _fill(model, new)
    expected_share = 1.0  # share of the old weights left in the warm-up EMA
    for n in range(1, 2001):
        plain.update_parameters(model)
        warm.update_parameters(model)
        expected_share *= min(decay, (1 + n) / (10 + n))
    w, p = _float_tensors(warm.module)[0], _float_tensors(plain.module)[0]
    torch.testing.assert_close(w, torch.full_like(w, new - expected_share), rtol=0, atol=1e-12)
    assert (new - w).max() < 1e-3 * (new - p).min()  # plain EMA still holds 0.999^2000 = 13.5%


@pytest.mark.parametrize("decay", [0.999, 0.9995])
def test_warmup_average_is_a_power_function_of_the_step_until_decay_binds(decay):
    """With the warm-up, N < (10 d - 1) / (1 - d) updates leave the average sum_k c_k theta_k with the
    closed form c_0 = 10! N! / (N + 9)! (the first update copies) and, for k >= 1,
    c_k = 9 N! (k + 9)! / ((k + 1)! (N + 9)!), proportional to (k + 2)...(k + 9): the decay d never enters."""
    N = 300
    thetas = torch.randn(N, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model = _model()
    ema = make_ema(model, decay, warmup=True)
    for theta in thetas:
        _fill(model, float(theta))
        ema.update_parameters(model)
    k = torch.arange(N, dtype=torch.float64)
    lgamma = lambda x: torch.lgamma(torch.as_tensor(x, dtype=torch.float64))  # noqa: E731  ln (x - 1)!
    log_norm = lgamma(N + 1.0) - lgamma(N + 10.0)  # ln N! / (N + 9)!
    c = 9 * torch.exp(log_norm + lgamma(k + 10) - lgamma(k + 2))
    c[0] = torch.exp(log_norm + lgamma(11.0))
    torch.testing.assert_close(c.sum(), torch.tensor(1.0, dtype=torch.float64), rtol=1e-12, atol=0)
    expected = (c * thetas).sum()
    for t in _float_tensors(ema.module):
        torch.testing.assert_close(t, torch.full_like(t, float(expected)), rtol=0, atol=1e-12)
