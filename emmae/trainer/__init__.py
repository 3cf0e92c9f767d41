"""Masked-autoencoder training (PyTorch). Imports torch; the runtime never imports this package."""
