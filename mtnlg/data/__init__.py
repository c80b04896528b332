"""Data pipeline: tokenizers, Megatron ``.bin/.idx`` preprocessing, indexed and GPT datasets.

Modules: ``tokenizer`` (``build_tokenizer``), ``indexed_dataset`` (``MMapIndexedDataset``,
``MMapIndexedDatasetBuilder``), ``preprocess`` / ``merge`` / ``train_tokenizer`` (CLIs),
``gpt_dataset`` (``GPTDataset``, ``build_train_valid_test_datasets``), ``blending``.
"""
