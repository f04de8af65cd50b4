"""What goes to disk and comes back: checkpoint folders (with the ``config.json`` and tokenizer files
transformers reads), training run folders, tokenizers, the published paper checkpoints, and opening
the model a command names; and what they all rely on: atomic writes, content hashes, and text and
YAML read strictly."""
