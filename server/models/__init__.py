"""The embedded model family: byte-level tokenizer and tiny deterministic causal LMs."""
