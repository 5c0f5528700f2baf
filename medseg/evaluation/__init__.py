"""Segmentation metrics (Dice, IoU, HD95, normalised surface Dice) and reports."""
