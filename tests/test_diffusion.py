"""Diffusion math and samplers against closed forms, with analytic 'oracle' eps-models instead of a network.

For data that is one point c, the optimal predictor is eps*(xt, t) = (xt - sqrt(a_t) c)/sqrt(1 - a_t);
for data N(m, s^2) per pixel it is E[eps | xt] = sqrt(1 - a_t) / (a_t s^2 + 1 - a_t) (xt - sqrt(a_t) m),
with a_t = alpha_bar_t. Both make the samplers and the bound checkable without training; for the
Gaussian the probability-flow ODE even has a closed-form solution to measure the solvers against.
"""

import math

import pytest
import torch

from common.tensor import extract
from ddpm.bound import vlb_bits_per_dim
from ddpm.config import VPrediction
from ddpm.diffusion import GaussianDiffusion
from ddpm.samplers import Denoiser, SamplerSpec, sample, timesteps
from ddpm.schedule import cosine_betas, lognormal_t_probs

F64 = torch.float64
T = 1000


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Small tensors gain nothing from intra-op threads, and on a busy 2-core machine they lose a lot.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


DIFF = GaussianDiffusion(cosine_betas(T))


@pytest.fixture(scope="module")
def diff() -> GaussianDiffusion:
    return DIFF


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def alpha_bar(diff, t, x):
    return extract(diff.alpha_bar.to(x.dtype), t, x.shape)


def point_oracle(diff, c):
    def eps_model(xt, t, y):
        a = alpha_bar(diff, t, xt)
        return (xt - a.sqrt() * c) / (1 - a).sqrt()

    return eps_model


def gaussian_oracle(diff, m, s):
    def eps_model(xt, t, y):
        a = alpha_bar(diff, t, xt)
        return (1 - a).sqrt() / (a * s**2 + 1 - a) * (xt - a.sqrt() * m)

    return eps_model


def toy_model(xt, t, y):
    """Some smooth non-oracle predictor, so that paths depend on the noise."""
    out = 0.7 * torch.tanh(xt) + 1e-3 * t.to(xt.dtype).view(-1, *([1] * (xt.dim() - 1)))
    if y is not None:
        out = out + 0.05 * y.to(xt.dtype).view(-1, *([1] * (xt.dim() - 1)))
    return out


toy_model.null_label = 10  # what guidance reads from a model: its "no label" class


def spec(sampler="ddpm", steps=None, **kw):
    """A sampler setting for the tests: plain (uniform spacing, to t = 0, unguided) unless asked."""
    kw = {"spacing": "uniform", "sigma_min": None, "guidance": 0.0, "guidance_interval": None, **kw}
    return SamplerSpec(sampler, steps or T, **kw)


def draw(model, shape, sampler="ddpm", steps=None, y=None, seed=0, dtype=F64, trajectory=None, **kw):
    """x0 from `sample` with noise xT and every step's noise from one seeded generator."""
    g = gen(seed)
    xT = torch.randn(shape, generator=g, dtype=dtype)
    return sample(DIFF, model, spec(sampler, steps, **kw), xT, y, g, trajectory)


def point(shape=(1, 1, 4, 4), seed=0):
    """A point c in [-1, 1]^d that includes both corners."""
    c = torch.rand(shape, generator=gen(seed), dtype=F64) * 2 - 1
    c.view(-1)[0], c.view(-1)[1] = -1.0, 1.0
    return c


# ------------------------------------------------------------------ forward process, posterior
def test_arrays_float64_and_consistent(diff):
    for name in ("betas", "alphas", "alpha_bar", "alpha_bar_prev", "posterior_variance",
                 "posterior_log_variance_clipped", "posterior_mean_coef_x0", "posterior_mean_coef_xt"):
        a = getattr(diff, name)
        assert a.dtype == F64 and a.shape == (T,), name
    assert diff.alpha_bar_prev[0] == 1 and torch.equal(diff.alpha_bar_prev[1:], diff.alpha_bar[:-1])


def test_alpha_bar_is_the_cosine_closed_form(diff):
    # Nichol & Dhariwal 2021, eq. 17, written out here: alpha_bar_t = f(t) / f(0) in the paper's
    # 1-based t, f(u) = cos^2((u / T + s) / (1 + s) pi / 2), but for the last step, whose beta is
    # capped at 0.999.
    def f(u):
        return math.cos((u / T + 0.008) / 1.008 * math.pi / 2) ** 2

    expected = torch.tensor([f(t + 1) / f(0) for t in range(T - 1)], dtype=F64)
    assert torch.allclose(diff.alpha_bar[:-1], expected, rtol=1e-10, atol=1e-15)
    assert torch.allclose(diff.sigma**2, (1 - diff.alpha_bar) / diff.alpha_bar, rtol=1e-12)


def test_q_sample_moments(diff):
    n = 20000
    c = point((1, 8))
    ts = [0, 10, 250, 500, 999]
    x0 = c.expand(n * len(ts), 8)
    t = torch.tensor(ts).repeat_interleave(n)
    eps = torch.randn(x0.shape, generator=gen(1), dtype=F64)
    xt = diff.q_sample(x0, t, eps).view(len(ts), n, 8)
    for i, ti in enumerate(ts):
        a = diff.alpha_bar[ti]
        sd = (1 - a).sqrt()
        assert torch.allclose(xt[i].mean(0), a.sqrt() * c[0], atol=5 * sd.item() / n**0.5, rtol=0)
        assert torch.allclose(xt[i].var(0), (1 - a).expand(8), rtol=5 * (2 / n) ** 0.5, atol=0)


def test_predict_x0_inverts_q_sample(diff):
    x0 = torch.rand(T, 1, 3, 3, generator=gen(2), dtype=F64) * 2 - 1
    eps = torch.randn(x0.shape, generator=gen(3), dtype=F64)
    t = torch.arange(T)
    xt = diff.q_sample(x0, t, eps)
    assert torch.allclose(diff.predict_x0(xt, t, eps), x0, atol=1e-9, rtol=0)
    assert torch.allclose(diff.predict_eps(xt, t, x0), eps, atol=1e-9, rtol=0)
    # int t means the whole batch at that step
    assert torch.equal(diff.q_sample(x0, 7, eps), diff.q_sample(x0, torch.full((T,), 7), eps))


def test_posterior_mean_equals_eps_form(diff):
    # Ho eq. 11: mu_tilde(x0(xt, eps), xt) = (xt - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t)
    x0 = torch.rand(T, 1, 3, 3, generator=gen(4), dtype=F64) * 2 - 1
    eps = torch.randn(x0.shape, generator=gen(5), dtype=F64)
    t = torch.arange(T)
    xt = diff.q_sample(x0, t, eps)
    mean, _, _ = diff.q_posterior(diff.predict_x0(xt, t, eps), xt, t)
    beta, alpha, a = (extract(v, t, xt.shape) for v in (diff.betas, diff.alphas, diff.alpha_bar))
    eps_form = (xt - beta / (1 - a).sqrt() * eps) / alpha.sqrt()
    assert torch.allclose(mean, eps_form, atol=1e-9, rtol=1e-9)
    # and p_mean_variance without clipping is exactly that mean
    p_mean, *_ = diff.p_mean_variance(eps, t, xt, clip=False)
    assert torch.allclose(p_mean, eps_form, atol=1e-9, rtol=1e-9)


def test_posterior_is_bayes_rule(diff):
    # q(x_{t-1}|xt,x0) ∝ N(xt; sqrt(alpha_t) x_{t-1}, beta_t) N(x_{t-1}; sqrt(ab_{t-1}) x0, 1 - ab_{t-1})
    t = torch.arange(1, T)
    x0 = torch.rand(T - 1, 1, 2, 2, generator=gen(6), dtype=F64) * 2 - 1
    xt = torch.randn(x0.shape, generator=gen(7), dtype=F64)
    beta, alpha, abp = (extract(v, t, xt.shape) for v in (diff.betas, diff.alphas, diff.alpha_bar_prev))
    precision = alpha / beta + 1 / (1 - abp)
    mean_bayes = (alpha.sqrt() / beta * xt + abp.sqrt() / (1 - abp) * x0) / precision
    mean, var, log_var = diff.q_posterior(x0, xt, t)
    assert torch.allclose(mean, mean_bayes, rtol=1e-9, atol=1e-10)
    assert torch.allclose(var, 1 / precision, rtol=1e-9, atol=0)
    assert torch.allclose(log_var, var.log(), rtol=1e-12, atol=1e-12)


def test_posterior_variance(diff):
    pv, beta = diff.posterior_variance, diff.betas
    assert pv[0] == 0
    assert bool((pv >= 0).all()) and bool((pv <= beta).all())
    x = torch.zeros(3, 1, 2, 2, dtype=F64)
    _, var0, log_var0 = diff.q_posterior(x, x, torch.zeros(3, dtype=torch.long))
    assert bool((var0 == 0).all()) and torch.isfinite(log_var0).all()  # log-variance clipped to beta_tilde_1
    assert torch.allclose(log_var0, pv[1].log().expand_as(log_var0))


# ---------------------------------------------------------------------------- single steps
def test_p_step_adds_no_noise_at_t0(diff):
    xt = torch.randn(4, 1, 3, 3, generator=gen(8), dtype=F64)
    eps = torch.randn(xt.shape, generator=gen(9), dtype=F64)
    big = torch.full_like(xt, 1e6)
    out = diff.p_step(eps, 0, xt, big)
    assert torch.equal(out, diff.p_step(eps, 0, xt, torch.zeros_like(xt)))
    # at t = 0 the posterior mean is x0_hat itself (clipped)
    assert torch.allclose(out, diff.predict_x0(xt, 0, eps).clamp(-1, 1), atol=1e-12)
    # at t > 0 the noise enters with std sqrt(beta_tilde_t)
    noise = torch.randn(xt.shape, generator=gen(10), dtype=F64)
    diff_noise = diff.p_step(eps, 500, xt, noise) - diff.p_step(eps, 500, xt, torch.zeros_like(xt))
    assert torch.allclose(diff_noise, diff.posterior_variance[500].sqrt() * noise, atol=1e-12)


@pytest.mark.parametrize("clip", [True, False])
def test_ddim_eta1_is_the_ddpm_step(diff, clip):
    xt = torch.randn(6, 1, 3, 3, generator=gen(11), dtype=F64) * 2
    eps = toy_model(xt, torch.zeros(6, dtype=torch.long), None)
    noise = torch.randn(xt.shape, generator=gen(12), dtype=F64)
    t = torch.tensor([0, 1, 2, 300, 998, 999])
    ddim = diff.ddim_step(eps, t, t - 1, xt, eta=1.0, noise=noise, clip=clip)
    assert torch.allclose(ddim, diff.p_step(eps, t, xt, noise, clip=clip), atol=1e-9, rtol=1e-9)


def test_respacing_every_step_gives_the_process_back(diff):
    sub = diff.respace(torch.arange(T - 1, -1, -1))
    names = ("betas", "alpha_bar", "posterior_variance", "posterior_mean_coef_x0", "posterior_mean_coef_xt")
    for name in names:
        assert torch.allclose(getattr(sub, name), getattr(diff, name), rtol=1e-9, atol=1e-15), name


def test_respaced_posterior_is_bayes_rule_across_a_jump(diff):
    # Between visited steps s < t: q(x_t | x_s) = N(sqrt(a_t / a_s) x_s, 1 - a_t / a_s) and
    # q(x_s | x0) = N(sqrt(a_s) x0, 1 - a_s); Bayes' rule gives q(x_s | x_t, x0), which the respaced
    # process's posterior at index i (visited step ts[i], previous ts[i - 1]) must equal.
    ts = torch.tensor([0, 3, 40, 41, 300, 999])
    sub = diff.respace(ts)
    x0 = torch.rand(len(ts) - 1, 1, 2, 2, generator=gen(40), dtype=F64) * 2 - 1
    xt = torch.randn(x0.shape, generator=gen(41), dtype=F64)
    i = torch.arange(1, len(ts))
    a_t, a_s = (extract(diff.alpha_bar, v, xt.shape) for v in (ts[1:], ts[:-1]))
    jump_var, prior_var = 1 - a_t / a_s, 1 - a_s
    precision = (a_t / a_s) / jump_var + 1 / prior_var
    mean_bayes = ((a_t / a_s).sqrt() / jump_var * xt + a_s.sqrt() / prior_var * x0) / precision
    mean, var, _ = sub.q_posterior(x0, xt, i)
    assert torch.allclose(mean, mean_bayes, rtol=1e-9, atol=1e-10)
    assert torch.allclose(var, 1 / precision, rtol=1e-9)


def test_timesteps(diff):
    assert torch.equal(timesteps(diff), torch.arange(T - 1, -1, -1))
    for steps in (2, 10, 50, 333, 999):
        ts = timesteps(diff, steps)
        assert len(ts) == steps and ts[0] == T - 1 and ts[-1] == 0
        assert bool((ts[1:] < ts[:-1]).all())
        gaps = ts[:-1] - ts[1:]
        assert gaps.max() - gaps.min() <= 1  # evenly spaced up to rounding
    assert torch.equal(timesteps(diff, 1), torch.tensor([T - 1]))
    with pytest.raises(ValueError):
        timesteps(diff, T + 1)


def test_timesteps_karras(diff):
    for steps in (2, 10, 20, 50, 333, T - 1, T):
        ts = timesteps(diff, steps, "karras")
        assert len(ts) == steps and ts[0] == T - 1 and ts[-1] == 0
        assert bool((ts[1:] < ts[:-1]).all())
    # Between the ends, each visited sigma_t is the first at or above Karras's sigma_i (eq. 5).
    steps, rho = 10, 7.0
    ts = timesteps(diff, steps, "karras", rho=rho, sigma_max=80.0)
    sigma = diff.sqrt_recipm1_alpha_bar
    i = torch.arange(steps, dtype=torch.float64) / (steps - 1)
    target = (80.0 ** (1 / rho) + i * (sigma[0] ** (1 / rho) - 80.0 ** (1 / rho))) ** rho
    for k in range(1, steps - 1):
        assert sigma[ts[k]] >= target[k] > sigma[ts[k] - 1]
    # Against even spacing: shorter first and last steps, a longer one in the middle.
    gaps, uniform_gaps = ts[:-1] - ts[1:], (lambda u: u[:-1] - u[1:])(timesteps(diff, steps))
    assert gaps[0] < uniform_gaps[0] and gaps[-1] < uniform_gaps[-1] and gaps.max() > uniform_gaps.max()
    with pytest.raises(ValueError):
        timesteps(diff, 10, "log")


def test_timesteps_sigma_min(diff):
    sigma = diff.sqrt_recipm1_alpha_bar
    for spacing in ("uniform", "karras"):
        # The default end, t = 0, is sigma_min = sigma_0.
        default_end = timesteps(diff, 10, spacing, sigma_min=sigma[0].item())
        assert torch.equal(default_end, timesteps(diff, 10, spacing))
        for sigma_min in (0.05, 0.1, 1.0):
            ts = timesteps(diff, 10, spacing, sigma_min=sigma_min)
            t_min = ts[-1].item()
            assert sigma[t_min] >= sigma_min > sigma[t_min - 1]  # the first t at or above it
            assert len(ts) == 10 and ts[0] == T - 1 and bool((ts[1:] < ts[:-1]).all())
    # Karras: the same eq. 5 between sigma_max and the new end.
    ts = timesteps(diff, 10, "karras", sigma_min=0.1)
    i = torch.arange(10, dtype=torch.float64) / 9
    lo = sigma[ts[-1]] ** (1 / 7)
    target = (80.0 ** (1 / 7) + i * (lo - 80.0 ** (1 / 7))) ** 7
    for k in range(1, 9):
        assert sigma[ts[k]] >= target[k] > sigma[ts[k] - 1]
    with pytest.raises(ValueError, match="leaves fewer than"):
        timesteps(diff, T, "uniform", sigma_min=0.1)


def test_sampling_ends_at_sigma_min_with_the_x0_prediction(diff):
    c = point()
    for sampler in ("ddim", "dpm2m", "ddpm"):
        traj = []
        out = draw(point_oracle(diff, c), (4, 1, 4, 4), sampler, 10, sigma_min=0.5, seed=17, trajectory=traj)
        assert [t for t, _ in traj] == timesteps(diff, 10, sigma_min=0.5).tolist() + [-1]
        assert (out - c).abs().max().item() < 1e-6  # the last step returns x0_hat, noise-free


def test_a_sampler_visiting_all_steps_ends_at_t0_whatever_sigma_min():
    # `ddpm.sample --sampler ddpm --steps 1000` with the default --sigma-min: every t is visited,
    # so there is no step to skip and nothing to space.
    full = SamplerSpec("ddpm", T, "karras", sigma_min=0.1).for_model(DIFF)
    assert full.sigma_min is None and full.spacing == "uniform" and full.name == "ddpm1000_w0.35_gi0.28-5.42"
    assert SamplerSpec("ddpm", 10, sigma_min=0.1).for_model(DIFF).sigma_min == 0.1
    with pytest.raises(ValueError, match="more than the model's T"):
        SamplerSpec("ddpm", T + 1).for_model(DIFF)
    with pytest.raises(ValueError, match="leaves fewer than"):
        SamplerSpec("ddim", T - 1, sigma_min=0.1).for_model(DIFF)
    with pytest.raises(ValueError, match="at least 2 steps"):  # the respaced process needs two
        SamplerSpec("ddpm", 1).for_model(DIFF)
    assert SamplerSpec("ddim", 1).for_model(DIFF).steps == 1  # DDIM's one jump to x0 is fine


# ------------------------------------------------------------------------------- samplers
def test_strided_ddpm_equals_ddim_eta1(diff):
    # Two routes to the same step between visited steps: the respaced process's posterior
    # (p_step) and DDIM's eq. 12 with eta = 1.
    a = draw(toy_model, (4, 1, 2, 2), "ddpm", 25, seed=15)
    b = draw(toy_model, (4, 1, 2, 2), "ddim", 25, eta=1.0, seed=15)
    assert torch.allclose(a, b, atol=1e-9)


@pytest.mark.parametrize(("sampler", "steps"), [("ddpm", 1000), ("ddim", 50), ("ddim", 10), ("dpm2m", 10)])
def test_point_oracle_returns_the_point(diff, sampler, steps):
    c = point()
    out = draw(point_oracle(diff, c), (16, 1, 4, 4), sampler, steps, seed=16)
    assert (out - c).abs().max().item() < 1e-3


def test_ddim_eta0_is_deterministic(diff):
    xT = torch.randn(5, 1, 4, 4, generator=gen(17), dtype=F64)
    a = sample(diff, toy_model, spec("ddim", 30), xT, None, gen(1))
    assert torch.equal(a, sample(diff, toy_model, spec("ddim", 30), xT, None, gen(2)))
    # while DDPM from the same xT depends on the step noise
    assert not torch.allclose(sample(diff, toy_model, spec("ddpm", 30), xT, None, gen(1)),
                              sample(diff, toy_model, spec("ddpm", 30), xT, None, gen(2)))  # fmt: skip


@pytest.mark.parametrize(
    ("sampler", "steps", "tol"), [("ddpm", 1000, 0.02), ("ddim", 50, 0.05), ("dpm2m", 20, 0.02)]
)
def test_gaussian_oracle_matches_data_distribution(diff, sampler, steps, tol):
    # 65536 draws: Monte Carlo error ~0.4% (mean) and ~0.3% (std), well below the tolerances.
    # Exact values (propagating mean and variance through the linear steps): DDPM std -0.4 %,
    # DDIM 50 steps -3.1 %, DDIM 10 steps -16 %: deterministic few-step DDIM shrinks the spread.
    m, s = 0.5, 0.5
    out = draw(gaussian_oracle(diff, m, s), (4096, 1, 4, 4), sampler, steps, seed=18, clip=False)
    assert abs(out.mean().item() - m) < tol * m
    assert abs(out.std().item() - s) < tol * s


def probability_flow_x0(diff, xT, m, s):
    """The exact answer of a deterministic sampler for data N(m, s^2) per pixel, from xT at t = T-1.

    The marginals are N(mu_t, v_t) with mu_t = sqrt(a_t) m, v_t = a_t s^2 + 1 - a_t. The probability-
    flow ODE is linear in x and carries each marginal to the next, so its solution is the increasing
    affine map between them, x_t = mu_t + sqrt(v_t / v_T) (xT - mu_T): the standardised x is
    constant along a path. The samplers end with the denoiser's x0 prediction at their last step
    t = 0, E[x0 | x_0] = m + sqrt(a) s^2 / v (x - sqrt(a) m), so that is applied last.
    """
    a_T, a_0 = diff.alpha_bar[-1], diff.alpha_bar[0]
    mu_T, v_T, mu_0, v_0 = a_T.sqrt() * m, a_T * s**2 + 1 - a_T, a_0.sqrt() * m, a_0 * s**2 + 1 - a_0
    x_t0 = mu_0 + (v_0 / v_T).sqrt() * (xT - mu_T)
    return m + a_0.sqrt() * s**2 / v_0 * (x_t0 - mu_0)


@pytest.mark.parametrize("spacing", ["uniform", "karras"])
def test_ddim_and_dpm_solver_converge_to_the_exact_probability_flow(diff, spacing):
    m, s = 0.3, 0.6
    xT = torch.randn(256, 1, 2, 2, generator=gen(19), dtype=F64)
    exact = probability_flow_x0(diff, xT, m, s)

    def err(sampler, steps):
        out = sample(diff, gaussian_oracle(diff, m, s), spec(sampler, steps, spacing=spacing, clip=False), xT)
        return (out - exact).abs().max().item()

    steps = (5, 10, 40, 160)
    ddim, dpm = [err("ddim", n) for n in steps], [err("dpm2m", n) for n in steps]
    assert all(a > b for a, b in zip(ddim, ddim[1:], strict=False)), ddim  # error falls with more steps
    assert all(a > b for a, b in zip(dpm, dpm[1:], strict=False)), dpm
    assert all(d < 0.35 * e for d, e in zip(dpm[1:], ddim[1:], strict=True)), (dpm, ddim)  # second order wins
    assert 3 < ddim[2] / ddim[3] < 5  # first order: 4x the steps, a quarter of the error ...
    assert dpm[2] / dpm[3] > 1.5 * ddim[2] / ddim[3]  # ... and DPM-Solver++(2M)'s falls faster
    assert err("dpm2m", T) < 1e-4  # with every step the solver lands on the closed form


# ------------------------------------------------------------------- guidance, API details
def test_guidance_zero_is_conditional_and_w_mixes_two_predictions(diff):
    x = torch.randn(4, 1, 3, 3, generator=gen(19))
    y = torch.tensor([0, 3, 7, 9])
    t_b = torch.full((4,), 50)
    plain = Denoiser(toy_model, y, diff.sigma, guidance=0.0)
    assert torch.equal(plain(x, 50), toy_model(x, t_b, y))
    w = 2.5
    expected = (1 + w) * toy_model(x, t_b, y) - w * toy_model(x, t_b, torch.full_like(y, 10))
    assert torch.allclose(Denoiser(toy_model, y, diff.sigma, guidance=w)(x, 50), expected, atol=1e-5)


def test_sample_guidance_one_batched_call_with_the_models_null_label(diff):
    calls = []

    def model(xt, t, y):
        calls.append((xt.shape[0], t.shape[0], None if y is None else y.clone()))
        return toy_model(xt, t, y)

    model.null_label = 10
    y = torch.tensor([2, 4, 6])
    w = 1.5
    out = draw(model, (3, 1, 2, 2), "ddim", 8, y=y, guidance=w, seed=20)
    assert len(calls) == 8
    assert all(n == 6 and nt == 6 and torch.equal(yy, torch.tensor([2, 4, 6, 10, 10, 10]))
               for n, nt, yy in calls)  # fmt: skip

    def explicit(xt, t, yy):  # the guided model written out, as its own callable
        return (1 + w) * toy_model(xt, t, yy) - w * toy_model(xt, t, torch.full_like(yy, 10))

    assert torch.allclose(out, draw(explicit, (3, 1, 2, 2), "ddim", 8, y=y, seed=20), atol=1e-9)
    # w = 0: the conditional model alone, one call of batch B per step
    calls.clear()
    out0 = draw(model, (3, 1, 2, 2), "ddim", 8, y=y, seed=20)
    assert len(calls) == 8 and all(n == 3 for n, _, _ in calls)
    assert torch.equal(out0, draw(toy_model, (3, 1, 2, 2), "ddim", 8, y=y, seed=20))
    # the null label is the model's own
    calls.clear()
    model.null_label = 0
    draw(model, (3, 1, 2, 2), "ddim", 8, y=y, guidance=w, seed=20)
    assert torch.equal(calls[0][2], torch.tensor([2, 4, 6, 0, 0, 0]))


def test_guidance_interval(diff):
    calls = []

    def model(xt, t, y):
        calls.append((xt.shape[0], int(t[0])))
        return toy_model(xt, t, y)

    model.null_label = 10
    y = torch.tensor([2, 4, 6])
    shape = (3, 1, 2, 2)
    sigma = diff.sigma
    # an interval holding every step's sigma is plain guidance; an empty one is w = 0
    full = draw(model, shape, "ddim", 10, y=y, guidance=2.0, guidance_interval=(0.0, math.inf), seed=21)
    assert torch.equal(full, draw(toy_model, shape, "ddim", 10, y=y, guidance=2.0, seed=21))
    none = draw(toy_model, shape, "ddim", 10, y=y, guidance=2.0, guidance_interval=(5.0, 5.0), seed=21)
    assert torch.equal(none, draw(toy_model, shape, "ddim", 10, y=y, seed=21))
    # in between: batch 2B exactly at the steps with lo < sigma_t <= hi, batch B elsewhere
    lo, hi = 0.5, 3.0
    calls.clear()
    mixed = draw(model, shape, "ddim", 10, y=y, guidance=2.0, guidance_interval=(lo, hi), seed=21)
    guided_steps = [t for n, t in calls if n == 6]
    assert guided_steps and len(guided_steps) < len(calls)
    for n, t in calls:
        assert (n == 6) == bool(lo < sigma[t] <= hi), (n, t)
    assert not torch.equal(mixed, full) and not torch.equal(mixed, none)
    setting = spec("ddim", 10, guidance=2.0, guidance_interval=(lo, hi))
    assert setting.passes(diff) == len(calls) + len(guided_steps)


def test_sample_shapes_range_and_unconditional(diff):
    seen = []

    def model(xt, t, y):
        seen.append(y)
        return toy_model(xt, t, y)

    out = sample(diff, model, spec("ddpm", 3), torch.randn(2, 1, 28, 28), torch.tensor([0, 1]))
    assert out.shape == (2, 1, 28, 28) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    seen.clear()
    out = sample(diff, model, spec("ddim", 4, guidance=2.0), torch.randn(3, 1, 8, 8))
    assert out.shape == (3, 1, 8, 8) and all(s is None for s in seen) and len(seen) == 4
    with pytest.raises(ValueError):
        SamplerSpec("euler")


def test_sample_trajectory(diff):
    traj = []
    out = draw(toy_model, (2, 1, 4, 4), "ddim", 5, seed=21, dtype=torch.float32, trajectory=traj)
    assert [t for t, _ in traj] == timesteps(diff, 5).tolist() + [-1]
    assert torch.equal(traj[-1][1], out)
    assert torch.equal(traj[0][1], torch.randn(2, 1, 4, 4, generator=gen(21)))  # xT
    assert all(x.shape == (2, 1, 4, 4) for _, x in traj)


def test_sample_determinism_under_generator(diff):
    y = torch.tensor([3, 8])
    for sampler, eta in (("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.7)):
        a, b, c = (draw(toy_model, (2, 1, 6, 6), sampler, 20, y=y, eta=eta, seed=s) for s in (22, 22, 23))
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_spec_names_labels_and_normalises():
    default = SamplerSpec()
    assert default.name == "dpm2m10_w0.35_karras_smin0.1_gi0.28-5.42"
    assert default.label == (
        "DPM-Solver++(2M), Karras spacing, to sigma 0.1, guided in sigma (0.28, 5.42], 10 steps, w = 0.35"
    )
    # what cannot matter is dropped: eta but for DDIM, the interval without guidance, sigma_min 0
    assert SamplerSpec("dpm2m", eta=0.5) == SamplerSpec("dpm2m")
    assert SamplerSpec(guidance=0.0).guidance_interval is None
    assert SamplerSpec(sigma_min=0.0).sigma_min is None
    assert SamplerSpec("ddim", 50, "uniform", sigma_min=None, eta=0.3, guidance=1.0, guidance_interval=None,
                       clip=False).name == "ddim50_w1_eta0.3_noclip"  # fmt: skip


# ------------------------------------------------------------------------------ objectives
def test_loss(diff):
    c = point()
    x0 = c.expand(256, 1, 4, 4)
    assert diff.loss(point_oracle(diff, c), x0, None, generator=gen(24)).item() < 1e-18
    zero = diff.loss(lambda xt, t, y: torch.zeros_like(xt), c.expand(4096, 1, 4, 4), None, generator=gen(25))
    assert zero.item() == pytest.approx(1.0, abs=0.02)  # E ||eps||^2 / d = 1
    per = diff.loss(toy_model, x0, None, generator=gen(26), reduction="none")
    assert per.shape == (256,)
    assert torch.equal(per.mean(), diff.loss(toy_model, x0, None, generator=gen(26)))
    # gradients reach the model; t covers 0..T-1 including the last step
    p = torch.zeros((), requires_grad=True)
    diff.loss(lambda xt, t, y: p * xt, x0, None, generator=gen(27)).backward()
    assert p.grad is not None and p.grad != 0
    seen = []
    many = c.expand(20000, 1, 4, 4).float()
    diff.loss(lambda xt, t, y: seen.append(t) or xt, many, None, generator=gen(28))
    assert seen[0].min() == 0 and seen[0].max() == T - 1


def test_min_snr_weighting(diff):
    t = torch.arange(T)
    snr = diff.alpha_bar / (1 - diff.alpha_bar)
    w = diff.min_snr_weight(t, 5.0).double()
    noisy = snr <= 5.0
    assert 0 < noisy.sum() < T  # the schedule spans both sides of gamma
    assert torch.allclose(w[noisy], torch.ones(int(noisy.sum()), dtype=torch.float64))
    assert torch.allclose(w[~noisy], 5.0 / snr[~noisy], rtol=1e-4)
    assert bool((w[1:] >= w[:-1]).all())  # non-decreasing in t: the clean end counts least
    # the weighted loss is the unweighted per-example loss times the weight of each drawn t
    x0 = point().expand(512, 1, 4, 4)
    seen = []
    plain = diff.loss(lambda xt, t, y: seen.append(t) or toy_model(xt, t, y), x0, None, generator=gen(29),
                      reduction="none")  # fmt: skip
    weighted = diff.loss(toy_model, x0, None, generator=gen(29), reduction="none", snr_gamma=5.0)
    assert torch.allclose(weighted, plain * diff.min_snr_weight(seen[0], 5.0).to(plain.dtype))
    assert bool((weighted < plain).any()) and bool((weighted <= plain + 1e-12).all())


@pytest.fixture(scope="module")
def grid_point():
    """Single-point data on the 256-level pixel grid, as a batch of 4 identical images."""
    k = torch.randint(0, 256, (1, 1, 4, 4), generator=gen(29))
    k.view(-1)[0], k.view(-1)[1] = 0, 255
    c = k.to(F64) / 127.5 - 1
    return c, c.expand(4, 1, 4, 4).contiguous()


def test_vlb_oracle_vs_zero_predictor(diff, grid_point):
    c, x0 = grid_point
    opt = vlb_bits_per_dim(diff, point_oracle(diff, c), x0, None, generator=gen(30))
    zero = vlb_bits_per_dim(diff, lambda xt, t, y: torch.zeros_like(xt), x0, None, generator=gen(30))
    for r in (opt, zero):
        assert r["terms"].shape == (4, T)
        assert r["total"].shape == r["prior"].shape == r["decoder"].shape == (4,)
        assert bool((r["terms"] >= 0).all())
        assert bool((r["prior"] >= 0).all()) and bool((r["prior"] < 1e-6).all())
        assert torch.equal(r["decoder"], r["terms"][:, 0])
    assert opt["terms"][:, 1:].max().item() < 1e-9  # x0_hat = x0 exactly: the KLs vanish
    assert bool((opt["total"] < 0.1 * zero["total"]).all())


def test_vlb_decoder_and_chunking(diff, grid_point):
    c, x0 = grid_point
    oracle = point_oracle(diff, c)
    r = vlb_bits_per_dim(diff, oracle, x0, None, t_batch=7, generator=gen(31))
    # with x0_hat = c the decoder is the discretized N(c, beta_tilde_1) mass of c's own bin
    normal = torch.distributions.Normal(c, diff.posterior_variance[1].sqrt())
    upper = torch.where(c > 0.999, torch.ones_like(c), normal.cdf(c + 1 / 255))
    lower = torch.where(c < -0.999, torch.zeros_like(c), normal.cdf(c - 1 / 255))
    bits = -(upper - lower).log2().mean()
    assert torch.allclose(r["decoder"], bits.expand(4), rtol=1e-6)
    r_all = vlb_bits_per_dim(diff, oracle, x0, None, t_batch=T, generator=gen(31))
    assert torch.allclose(r["total"], r_all["total"], rtol=1e-9)
    # labels are repeated alongside the chunked batch
    seen = []

    def labelled(xt, t, y):
        seen.append((t, y))
        return oracle(xt, t, y)

    vlb_bits_per_dim(diff, labelled, x0, torch.tensor([1, 2, 3, 4]), t_batch=300)
    assert len(seen) == 4  # ceil(1000 / 300) model calls
    t0, y0 = seen[0]
    assert torch.equal(y0, torch.tensor([1, 2, 3, 4]).repeat(300))
    assert torch.equal(t0, torch.arange(300).repeat_interleave(4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_with_a_cpu_generator(diff):
    y = torch.tensor([1, 2])
    setting = spec("ddpm", 10)
    g = gen(40)
    cpu = sample(diff, toy_model, setting, torch.randn(2, 1, 4, 4, generator=g, dtype=F64), y, g)
    g = gen(40)
    xT = torch.randn(2, 1, 4, 4, generator=g, dtype=F64).cuda()
    gpu = sample(diff, toy_model, setting, xT, y.cuda(), g)
    assert gpu.device.type == "cuda" and torch.allclose(gpu.cpu(), cpu, atol=1e-9)
    x0 = torch.rand(8, 1, 4, 4, dtype=F64) * 2 - 1
    assert torch.allclose(diff.loss(toy_model, x0.cuda(), None, generator=gen(41)).cpu(),
                          diff.loss(toy_model, x0, None, generator=gen(41)), atol=1e-9)


def test_v_prediction_is_eps_prediction_with_hang_et_al_v_weight(diff):
    """`VPrediction`: v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022) converts back to the eps of
    eq. 4, and the Min-SNR eps loss of the converted output is Hang et al. 2023's v loss
    min(SNR, gamma) / (SNR + 1) ||v - v_hat||^2, written here from the definitions."""
    x0 = torch.rand(64, 1, 4, 4, generator=gen(60), dtype=F64) * 2 - 1
    eps = torch.randn(64, 1, 4, 4, generator=gen(61), dtype=F64)
    t = torch.randint(0, T, (64,), generator=gen(62))
    a = alpha_bar(diff, t, x0)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    assert torch.allclose(diff.eps_from_v(xt, t, v), eps, atol=1e-10)

    class VNet(torch.nn.Module):  # any network that outputs "v": here a fixed smooth function
        null_label = 10

        def forward(self, xt, t, y):
            return torch.tanh(xt) * 0.3 + t[:, None, None, None] / T

    v_hat = VNet()(xt, t, None)
    eps_hat = VPrediction(VNet(), diff)(xt, t, None)
    loss = diff.eps_loss(eps_hat, eps, t, snr_gamma=5.0)
    snr = a / (1 - a)
    v_loss = (snr.clamp(max=5.0) / (snr + 1)).flatten() * ((v - v_hat) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(loss.double(), v_loss, rtol=1e-5)


def test_lognormal_t_probs_round_a_lognormal_noise_level_to_the_nearest_step(diff):
    """`schedule.lognormal_t_probs` against sampling: draw ln sigma ~ N(-1.2, 1.2^2) directly, send
    each draw to the step whose ln sigma_t is nearest, and count. The counts must match P(t) (and P
    sums to 1)."""
    p = lognormal_t_probs(diff.sigma, -1.2, 1.2)
    assert p.shape == (T,) and (p >= 0).all() and abs(p.double().sum().item() - 1) < 1e-6
    n = 2_000_000
    draws = -1.2 + 1.2 * torch.randn(n, generator=gen(70), dtype=F64)
    log_sigma = diff.sigma.log()
    i = torch.searchsorted(log_sigma, draws).clamp(1, T - 1)  # neighbours i - 1, i
    nearest = torch.where(draws - log_sigma[i - 1] < log_sigma[i] - draws, i - 1, i)
    counts = torch.bincount(nearest, minlength=T).double() / n
    se = (p.double() * (1 - p.double()) / n).sqrt()  # binomial standard error of each count
    assert ((counts - p.double()).abs() <= 5 * se + 1e-7).all()
    # and the draws of t give back the normal's moments of ln sigma_t
    t = torch.multinomial(p, n, replacement=True, generator=gen(71))
    assert abs(log_sigma[t].mean().item() + 1.2) < 0.01 and abs(log_sigma[t].std().item() - 1.2) < 0.01
