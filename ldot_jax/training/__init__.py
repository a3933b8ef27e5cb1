"""Layer 8, training: losses, the sharded contrastive loss, hard negatives, tasks (one per
objective, registered by name), the optimizer, metric writing and the train loop."""
