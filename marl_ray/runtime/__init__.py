"""The Ray runtime: typed messages, the model host, rollout workers, the host group and placement."""
