"""Complete partly observed test digits with a trained VAE: `python -m vaegen.complete --mask top`.

The VAE's answer to "what is the rest of this digit?" is its posterior over z given only the
observed pixels x_o, then the decoder:

    p(z | x_o) ∝ p(z) p_theta(x_o | z),   p_theta(x_o | z) = prod_{j observed} p_theta(x_j | z),

since the decoder's pixels are independent given z (the missing ones simply drop out of the
product). We sample it by importance resampling (`posterior_draws`): K proposals z_i from a
Gaussian q built by the encoder, weights w_i = p(z_i) p(x_o | z_i) / q(z_i) (Burda et al. 2015's
weights, over the observed pixels only), then draws in proportion to w. It targets the exact
posterior as K grows, where a few steps of optimising an observed-pixel ELBO would give a
Gaussian fit that is narrower than the posterior, and so completions that vary less than they
should. The encoder never saw half-images, so the proposal comes from a filled-in image: the
missing pixels black at first, then the weighted mean of the first round's decoded images, with
the encoder's standard deviation doubled so that the proposal covers the posterior's tails.
Each completion is the decoder's mean image for a drawn z, with the observed pixels put back.
Shared with `ddpm.complete`: the digits, masks, scores and files (`common.completion`).
"""

from __future__ import annotations

import math
import sys

import torch

from common.checkpoint import existing_run_dir
from common.cli import UserError, positive_int, user_errors
from common.completion import completion_parser, run_completion
from common.data import to_unit, unit_to_uint8
from common.distributions import normal_log_prob
from common.runtime import pick_device
from vaegen.elbo import decoder_log_prob
from vaegen.model import VAE, reparameterize
from vaegen.sample import load_vae

PROPOSAL_WIDENING = math.log(4.0)  # log-variance added to the encoder's: twice its std


@torch.no_grad()
def observed_log_weights(
    model: VAE,
    x: torch.Tensor,
    observed: torch.Tensor,
    x_filled: torch.Tensor,
    k: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K proposals z [K, B, J] from q = N(mu, 4 sigma^2) of the encoder on x_filled [B, 784], and
    log w = log p_theta(x_o | z) + log p(z) - log q(z) [K, B], for x [B, 784] in [0, 1] and
    observed bool [B, 784]."""
    mu, logvar = model.encode(x_filled)
    logvar = logvar + PROPOSAL_WIDENING
    eps = torch.randn((k, *mu.shape), generator=generator).to(mu)
    z = reparameterize(mu, logvar, eps)
    params = model.decode(z)  # [K, B, 784] or [K, B, 1568]
    log_px = (decoder_log_prob(model.config.decoder, x.expand(k, *x.shape), params) * observed).sum(-1)
    log_pz = normal_log_prob(z, torch.zeros_like(z), torch.zeros_like(z)).sum(-1)
    return z, log_px + log_pz - normal_log_prob(z, mu, logvar).sum(-1)


@torch.no_grad()
def posterior_draws(
    model: VAE, x: torch.Tensor, observed: torch.Tensor, k: int, generator: torch.Generator
) -> torch.Tensor:
    """One z [B, J] per image drawn from p(z | x_o) by importance resampling with K proposals
    (two rounds: the second's proposal is the encoder on the first round's weighted completion)."""
    x_filled = torch.where(observed, x, torch.zeros_like(x))
    for _ in range(2):
        z, log_w = observed_log_weights(model, x, observed, x_filled, k, generator)
        w = torch.softmax(log_w, dim=0)  # [K, B], self-normalised
        means = model.mean_image(model.decode(z))  # [K, B, 784]
        x_filled = torch.where(observed, x, (w[..., None] * means).sum(0))
    pick = torch.multinomial(w.T.cpu(), 1, generator=generator).squeeze(1).to(z.device)  # [B]
    return z[pick, torch.arange(z.shape[1], device=z.device)]


def completer(model: VAE, k: int):
    """`common.completion`'s complete(): uint8 digits and masks [B, 28, 28] -> uint8 completions."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def complete(digits: torch.Tensor, observed: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = to_unit(digits).reshape(len(digits), -1).to(device)
        m = observed.reshape(len(digits), -1).to(device)
        z = posterior_draws(model, x, m, k, generator)
        filled = unit_to_uint8(model.mean_image(model.decode(z))).reshape(digits.shape).cpu()
        return torch.where(observed, digits, filled)

    return complete


def build_parser():
    p = completion_parser("python -m vaegen.complete", __doc__, "results/vae")
    p.add_argument("--proposals", type=positive_int, default=1000, help="importance samples K per digit")
    p.set_defaults(batch_size=20)  # K x batch decoded images at once: 20 k rows of 784
    return p


@user_errors
def main(argv: list[str] | None = None) -> dict:
    a = build_parser().parse_args(argv)
    run, device = existing_run_dir(a.run), pick_device(a.device)
    model = load_vae(run, device)
    if model.conditional:
        raise UserError(f"{run}: a conditional VAE; completion infers the digit (train one without it)")
    method = {
        "model": "vae",
        "decoder": model.config.decoder,
        "posterior": f"importance resampling, {a.proposals} proposals, two rounds",
    }
    command = "python -m vaegen.complete " + " ".join(sys.argv[1:] if argv is None else argv)
    return run_completion(a, run, completer(model, a.proposals), method, command)


if __name__ == "__main__":
    main()
