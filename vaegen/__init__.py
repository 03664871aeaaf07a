"""Variational autoencoder (Kingma & Welling 2013) on MNIST."""
