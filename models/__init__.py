"""inspectray's model library.

Plain PyTorch networks, datasets and transforms,
metrics and the artifact registry. Nothing here imports Ray; training (``tune``),
serving (``deployments``) and the cluster (``cluster``) build on it.
"""
