"""The gateway: the hot path from a model's stable URL to a version endpoint's replica."""
