"""Bringing inspectray up.

The ``inspectray`` command line, the local Redis server,
the local Ray cluster and multi-node clusters on one host.
"""
