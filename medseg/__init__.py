"""medseg: self-configuring 3D medical image segmentation (nnU-Net-class), CPU-first."""

__version__ = "0.1.0"
