"""Transfer learning: initialise a model from another checkpoint.

Every tensor whose name and shape match is copied (encoder, decoder, and heads when the class
count agrees); the rest keep their fresh initialisation and are reported, so a pretrained
model can be fine-tuned on a dataset with another label set.
"""

from __future__ import annotations

from pathlib import Path

import torch

from medseg.errors import CheckpointError


def read_pretrained_weights(source: str | Path) -> dict[str, torch.Tensor]:
    """A medseg model folder (its first fold), a fold folder, or a .safetensors file."""
    from medseg.inference.predictor import resolve_model
    from medseg.io.checkpoint import available_folds, load_weights

    p = Path(source)
    if p.is_file():
        if p.suffix != ".safetensors":
            raise CheckpointError(p, "pretrained weights must be a .safetensors file or a medseg model folder")
        from safetensors.torch import load_file

        return load_file(str(p))
    if (p / "checkpoint.json").is_file():
        return load_weights(p)
    folder = resolve_model(source)
    folds = available_folds(folder)
    if not folds:
        raise CheckpointError(folder, "model folder holds no fold_*/ weights")
    return load_weights(folder / f"fold_{folds[0]}")


def load_pretrained(model: torch.nn.Module, source: str | Path) -> dict:
    src = read_pretrained_weights(source)
    own = model.state_dict()
    loaded, skipped = 0, []
    for name, tensor in own.items():
        if name in src and src[name].shape == tensor.shape:
            own[name] = src[name].to(tensor.dtype)
            loaded += 1
        else:
            skipped.append(name)
    model.load_state_dict(own)
    return {"loaded": loaded, "skipped": skipped}
