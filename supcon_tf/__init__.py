"""Supervised contrastive learning (SupCon) in pure TensorFlow."""

__version__ = "0.1.0"
