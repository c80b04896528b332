"""Evaluation: perplexity of a checkpoint on a validation split or a text file."""
