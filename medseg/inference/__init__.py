"""Sliding-window prediction, TTA, fold ensembling, export in native geometry."""
