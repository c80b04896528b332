"""Evaluation: perplexity, Megatron-LM's zero-shot WikiText and LAMBADA, an lm-eval model."""
