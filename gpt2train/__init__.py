"""GPT-2 training, fine-tuning, evaluation and sampling in JAX."""

__version__ = "0.1.0"
