"""Training: settings, data -> token cache -> batches, the train loop with its optimizer and metrics,
checkpoints that resume exactly, and data parallelism over the processes ``torchrun`` starts."""
