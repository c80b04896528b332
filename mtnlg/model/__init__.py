"""GPT model: plain module (``GPTModel``) and DeepSpeed pipeline form (``GPTPipe``)."""

from mtnlg.model.gpt import GPTLoss, GPTModel, seed_everything

__all__ = ["GPTLoss", "GPTModel", "seed_everything"]
