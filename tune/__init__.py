"""Training and sweeps on Ray.

One Ray Train ``TorchTrainer`` per model family and
the Ray Tune sweeps over them. Builds on ``models``; writes artifacts to the registry.
"""
