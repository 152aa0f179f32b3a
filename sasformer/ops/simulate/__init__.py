"""SAS simulation ops: the plain reference (``naive``) and the default dispatch."""

from sasformer.ops.simulate.naive import simulate_features_naive, simulate_heads_naive

simulate_heads = simulate_heads_naive
simulate_features = simulate_features_naive

__all__ = ["simulate_heads", "simulate_features", "simulate_heads_naive", "simulate_features_naive"]
