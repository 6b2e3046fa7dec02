"""Consumers: the rollout group, the reward group and the lake writer."""
