"""Tools the package and its scripts share that belong to no single layer (ops, layers, models, train)."""
