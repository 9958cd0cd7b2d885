"""Serving on Ray Serve.

One deployment per model stage, the DAG that composes them,
the request/response schemas and the clients other services use. Builds on ``models``.
"""
