"""Post-training: verifiable tasks, SFT warm-up and RL losses (docs/post_training.md)."""
