"""File formats: checkpoint folders, training run folders, tokenizers, the published paper checkpoints,
and the atomic writes they all rely on."""
