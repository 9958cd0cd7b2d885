"""Load tests and benchmarks.

Locust users against the HTTP API and in-cluster
callers by DeploymentHandle, reporting ratios measured side by side in one run.
"""
