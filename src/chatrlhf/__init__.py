"""chatrlhf: align chat models with human feedback, starting from a reward model trained on comparisons."""

__version__ = "0.1.0"
