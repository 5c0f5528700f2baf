"""Radiology reports as supervision (ConTEXTual Net 3D, Huemann et al. 2025): sentence parsing
(:mod:`medseg.reports.parse`), report-style sentence generation from measured lesion facts
(:mod:`medseg.reports.generate`) and the SUV-threshold weak labeller (:mod:`medseg.reports.weak_label`).
See docs/grounding.md."""
