"""Checkpoint conversion: TP/PP rules, DeepSpeed layout, Hugging Face GPT-2 and Llama-family maps.

``mtnlg.checkpoint.api`` holds the functions other code imports; ``convert`` the streaming
commands behind ``checkpoint_tools/convert_checkpoint.py``.
"""

from mtnlg.checkpoint.api import (
    export_hf,
    load_full_state,
    load_into_model,
    merge_state,
    shard_state,
)
from mtnlg.checkpoint.rules import CheckpointError

__all__ = [
    "CheckpointError",
    "export_hf",
    "load_full_state",
    "load_into_model",
    "merge_state",
    "shard_state",
]
