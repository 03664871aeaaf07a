"""Class-conditional denoising diffusion (Ho et al. 2020) on MNIST."""
