"""Data: tokenizer, datasets, input pipelines."""
