"""cryo-EMMAE: self-supervised, streaming particle picking for cryo-EM."""

__version__ = "0.1.0"
