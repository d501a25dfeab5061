"""Evaluation against ground-truth boxes: datasets, metrics, baseline methods and the harness."""
