"""Sharding plans for multi-embedding models: planner wrapper, named strategies, plan printing."""
