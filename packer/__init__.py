"""packer: packed, boundary-indexed LLM training data."""

__version__ = "0.1.0"
