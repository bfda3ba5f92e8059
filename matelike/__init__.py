"""Matelike: train a small Chinese chat model from zero on one machine, scale out with torchrun."""

__version__ = "0.1.0"
