"""Model, meta-loss, streaming data, and the Ray Train loop that ties them together."""
