"""Whole-body CT tools (TotalSegmentator-class): class maps, per-structure statistics."""
