"""DeCLIP pre-training and zero-shot evaluation on Ascend NPU, CUDA and CPU."""

from declip.config import RunConfig, load_config

__all__ = ["RunConfig", "build_model", "load_config", "tokenize"]


def __getattr__(name: str):
    # Lazy so that `declip --help` and config validation never import torch.
    if name == "tokenize":
        from declip.text.tokenizer import tokenize

        return tokenize
    if name == "build_model":
        from declip.model import build_model

        return build_model
    raise AttributeError(name)
