"""Parallel building blocks. The module owning a parameter has a `weight_loader` that reads only its slice."""
