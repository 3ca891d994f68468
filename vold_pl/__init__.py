"""vold-pl: a PyTorch Lightning trainer that teaches vision-language models to reason."""

__version__ = "0.1.0"
