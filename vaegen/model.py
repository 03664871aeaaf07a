"""The MLP variational autoencoder of Kingma & Welling 2013 (Appendix C), optionally conditional.

Encoder q_phi(z|x) = N(z; mu, diag(sigma^2)) with (mu, log sigma^2) from one hidden layer
(Appendix C.2, eq. 12); decoder p_theta(x|z) = Bernoulli(sigmoid(logits)) from one hidden
layer (Appendix C.1, eq. 11). Shapes: x [B, 784] (or [B, 1, 28, 28]) in [0, 1], z [B, J].

With `decoder="logistic"` the same output layer gives, per pixel, the mean and log-scale of a
discretized logistic over the 256 pixel levels (Salimans et al. 2017, eq. 2): a likelihood of
the 8-bit data itself, in the same units as the DDPM's bound (`vaegen.elbo`).

The conditional variant (`conditional`) gives the one-hot label y to both networks,
q_phi(z|x, y) and p_theta(x|z, y), so that samples can be asked for a given digit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.cli import positive_int
from common.config import from_dict, option

DECODERS = ("bernoulli", "logistic")
# Outputs per pixel of each decoder: a logit, or a mean and a log-scale.
DECODER_OUTPUTS = {"bernoulli": 1, "logistic": 2}


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of the VAE: image_size^2 -> hidden -> latent_dim (and back); each field with a
    flag is one of `vaegen.train`'s (group "VAEConfig")."""

    hidden: int = option(400, "hidden units of the encoder and of the decoder", positive_int)
    latent_dim: int = option(20, "dimension J of z", positive_int)
    conditional: bool = option(False, "class-conditional VAE (the one-hot label in q and p)")
    decoder: str = option(
        "bernoulli", "p(x|z): bernoulli (one logit per pixel; grey levels as soft targets) or logistic "
        "(a discretized logistic over the 256 levels, Salimans et al. 2017: a likelihood of 8-bit data)",
        choices=DECODERS,
    )
    image_size: int = option(28, "image side", cli=False)
    num_classes: int = option(10, "digit classes (for the conditional VAE's labels)", cli=False)

    @property
    def data_dim(self) -> int:
        return self.image_size * self.image_size

    @classmethod
    def from_dict(cls, d: dict) -> VAEConfig:
        """The config a checkpoint recorded; older runs wrote num_classes None for an unconditional VAE."""
        if "conditional" not in d:
            classes = d.get("num_classes")
            d = {**d, "conditional": classes is not None, "num_classes": classes or 10}
        return from_dict(cls, d)


def reparameterize(
    mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None = None
) -> torch.Tensor:
    """z = mu + sigma * eps with eps ~ N(0, I) and sigma = exp(logvar / 2).

    Kingma & Welling 2013, Section 2.4 (z = g_phi(eps, x) = mu + sigma (.) eps): the sample
    is a differentiable function of (mu, logvar), so gradients reach the encoder.
    mu, logvar: [..., J]; eps: same shape (drawn from the global RNG if None) -> z [..., J].
    """
    if eps is None:
        eps = torch.randn_like(mu)
    return mu + torch.exp(0.5 * logvar) * eps


class VAE(nn.Module):
    """Encoder x -> hidden -> (mu, logvar); decoder z -> hidden -> logits (sigmoid for display)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        D, H, J = config.data_dim, config.hidden, config.latent_dim
        C = config.num_classes if config.conditional else 0
        # Encoder q_phi(z|x[, y]) (Appendix C.2)
        self.enc_hidden = nn.Linear(D + C, H)
        self.enc_mu = nn.Linear(H, J)
        self.enc_logvar = nn.Linear(H, J)
        # Decoder p_theta(x|z[, y]) (Appendix C.1)
        self.dec_hidden = nn.Linear(J + C, H)
        self.dec_logits = nn.Linear(H, D * DECODER_OUTPUTS[config.decoder])

    @torch.no_grad()
    def init_output_bias(self, pixel_mean: torch.Tensor, pixel_std: torch.Tensor | None = None) -> None:
        """Start the decoder at the average digit: Bernoulli logits logit(mean pixel); for the
        logistic decoder, means = the mean pixel and scales s = std * sqrt(3) / pi (a logistic's
        standard deviation is s pi / sqrt(3)).

        The first steps then fit shapes rather than the overall grey level (docs/experiments.md,
        "The VAE"). The weights keep PyTorch's default init. pixel_mean, pixel_std: [784] in [0, 1].
        """
        if self.config.decoder == "bernoulli":
            self.dec_logits.bias.copy_(torch.logit(pixel_mean.clamp(1e-3, 1 - 1e-3)))
            return
        std = pixel_std if pixel_std is not None else torch.full_like(pixel_mean, 0.3)
        log_scale = torch.log(std.clamp(min=1e-2) * math.sqrt(3.0) / math.pi)
        self.dec_logits.bias.copy_(torch.cat([pixel_mean, log_scale]))

    @property
    def conditional(self) -> bool:
        return self.config.conditional

    def _with_label(self, h: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Append the one-hot label to the input of a conditional network: [B, F] -> [B, F + C].

        y may be long [B] (a digit) or float [B, C] (e.g. a blend of two labels).
        """
        if not self.conditional:
            return h
        if y is None:
            raise ValueError("a conditional VAE needs the label y")
        if y.dim() == 1:
            y = F.one_hot(y.long(), self.config.num_classes)
        return torch.cat([h, y.to(h.dtype).expand(*h.shape[:-1], -1)], dim=-1)

    def encode(
        self, x: torch.Tensor, y: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, 784] or [B, 1, 28, 28] in [0, 1] -> (mu [B, J], logvar [B, J]) of q_phi(z|x)."""
        x = x.reshape(x.shape[0], -1)
        h = F.relu(self.enc_hidden(self._with_label(x, y)))
        return self.enc_mu(h), self.enc_logvar(h)

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """z [..., J] -> the parameters of p_theta(x|z): Bernoulli logits [..., 784], or for the
        logistic decoder means and log-scales [..., 2 * 784]; `mean_image` turns either into pixels.

        y (if conditional) must broadcast against z's leading dims, e.g. y [B] or [B, C] with z [B, J].
        """
        h = F.relu(self.dec_hidden(self._with_label(z, y)))
        return self.dec_logits(h)

    def mean_image(self, out: torch.Tensor) -> torch.Tensor:
        """What a figure shows of p_theta(x|z): [..., 784] in [0, 1] from `decode`'s output.

        Bernoulli: the pixel means sigmoid(logits). Logistic: the location of each pixel's
        logistic, clamped to [0, 1] (the levels the edge bins collect).
        """
        if self.config.decoder == "bernoulli":
            return torch.sigmoid(out)
        return out[..., : self.config.data_dim].clamp(0.0, 1.0)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor | None = None, eps: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One-sample pass: x [B, 784] -> (logits [B, 784], mu [B, J], logvar [B, J]).

        eps [B, J]: the noise of the reparameterization (drawn from the global RNG if None).
        """
        mu, logvar = self.encode(x, y)
        z = reparameterize(mu, logvar, eps)
        return self.decode(z, y), mu, logvar
