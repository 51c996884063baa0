"""peqa: parameter-efficient, quantization-aware fine-tuning (PEQA) from the command line."""

__version__ = "0.1.0"
