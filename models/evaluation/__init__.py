"""Evaluation: the pipeline over a test split, its metrics, and the report."""

from models.evaluation.records import ImageRecord

__all__ = ["ImageRecord"]
