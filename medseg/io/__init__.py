"""Reading and writing images, datasets and checkpoints."""
