"""mtnlg: Megatron-Turing NLG style 3D-parallel GPT training on DeepSpeed."""

__version__ = "0.1.0"
