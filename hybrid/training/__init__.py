"""Training: settings, data -> token cache -> batches, the train loop, and checkpoints that resume exactly."""
