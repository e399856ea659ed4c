"""Training: the RL loop, resilience around a step, checkpoints and the pure math."""
