"""The training images' outputs of the ViT's frozen part, computed once into a file
(`ViTCache`), and each step's batch of them (`Batches`): fine-tuning never runs the frozen
part twice, and an interrupted fill goes on where it stopped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from searchengine.config.settings import Settings
from searchengine.tuning import evaluation
from searchengine.tuning.datasets import CaptionedSet
from searchengine.tuning.training import batch_order
from searchengine.util.durable import write_json

if TYPE_CHECKING:
    import torch

    from searchengine.models.retrieval import RetrievalModel


class ViTCache:
    """Images' outputs of the ViT's frozen part [N, P, W] as float16 in a file, filled in
    order; `NAME.json` says how far, and which images could not be read, so an interrupted
    fill goes on."""

    def __init__(self, folder: Path, n: int, shape: tuple[int, int], name: str = "vit") -> None:
        self.folder = folder
        self.path = folder / f"{name}.f16"
        self.state_path = folder / f"{name}.json"
        self.n, self.shape = n, tuple(shape)
        state = self._state()
        mode = "r+" if self.path.exists() and self.path.stat().st_size == n * shape[0] * shape[1] * 2 else "w+"
        self.array = np.memmap(self.path, dtype=np.float16, mode=mode, shape=(n, *shape))
        if mode == "w+":
            state = {"done": 0, "bad": {}}
        self.done: int = state["done"]
        self.bad: dict[int, str] = {int(k): v for k, v in state["bad"].items()}

    def _state(self) -> dict:
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {"done": 0, "bad": {}}

    def fill(self, model: "RetrievalModel", frozen: Callable, images: list[Path], settings: Settings,
             progress: Callable[[int], None]) -> None:
        """The rest of the images through the indexer's read and decode stages and `frozen`
        (pixel values -> the frozen part's outputs)."""
        import torch

        decode = evaluation.decoder(model, settings)
        batch = evaluation.batch_size(model, settings)
        progress(self.done)
        while self.done < self.n:
            start, end = self.done, min(self.n, self.done + batch)
            rows, pixels = [], []
            for i in range(start, end):
                item = decode(images[i])
                if isinstance(item, str):
                    self.bad[i] = item
                else:
                    rows.append(i)
                    pixels.append(item.pixels)
            if pixels:
                self.array[rows] = frozen(torch.stack(pixels)).float().cpu().numpy().astype(np.float16)
                self.array.flush()
            self.done = end
            write_json(self.state_path, {"done": self.done, "bad": self.bad})
            progress(end - start)

    def rows(self, index: np.ndarray) -> "torch.Tensor":
        import torch

        return torch.from_numpy(np.asarray(self.array[np.asarray(index)], dtype=np.float32))


class Batches:
    """Each step's cached outputs, captions and random generator (the negatives), decided by
    the seed and the step alone: every run over this set sees the same batches."""

    def __init__(self, cache: ViTCache, rows: np.ndarray, train: CaptionedSet, batch: int, seed: int, device) -> None:
        self.cache, self.rows, self.train = cache, rows, train
        self.batch, self.seed, self.device = batch, seed, device
        self.per_epoch = max(1, len(rows) // batch)
        self.texts_of = train.image_texts()

    def at(self, step: int) -> tuple["torch.Tensor", list[str], np.random.Generator]:
        chosen = batch_order(step, self.per_epoch, self.batch, len(self.rows), self.seed)
        rng = np.random.default_rng([self.seed, 1_000_003, step])
        texts = [self.train.texts[int(rng.choice(self.texts_of[i]))] for i in chosen]
        return self.cache.rows(self.rows[chosen]).to(self.device), texts, rng
