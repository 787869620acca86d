"""What goes into the library and what comes out of it: plain records."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


from searchengine.store.records import ModelInfo
from searchengine.store.writes import Store


MODEL_TAG = "model"  # in a re-index's feature cache: the fingerprint of the model it was filled by, once complete


def read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


@dataclass
class ReconcileReport:
    added: int = 0
    removed: int = 0
    cache_dropped: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)


@dataclass(frozen=True)
class Recorded:
    """What an index remembers of how it was built: its model and its captioner."""

    model: ModelInfo | None
    captioner: tuple[bool, str | None] | None  # (captions on, caption model); None: never recorded
    roots: tuple[str, ...] = ()  # the folders it indexes


def recorded_in(store: Store) -> Recorded:
    return Recorded(store.model_info(), store.captioner(), tuple(store.roots()))


def model_info(model) -> ModelInfo:
    """What the store records about the model that makes its vectors."""
    return ModelInfo(
        name=model.name,
        fingerprint=model.fingerprint,
        num_vectors=model.num_query_tokens,
        dim=model.embed_dim,
        vit_shape=model.vit_shape,
        dtype=str(model.vision_dtype).replace("torch.", ""),
        device=model.device.split(":")[0],
    )
