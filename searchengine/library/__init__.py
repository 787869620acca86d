"""The library: the one way in to a data directory (store, vector index, caches), in the
write order that makes a crash at any moment repairable (see `core`). `records` are what goes
in and comes out; `opening` finds the store; `tiers`, `reindexing` and `health` are the parts of
`Library` by job."""

from searchengine.library.core import Library
from searchengine.library.records import Recorded, ReconcileReport, model_info
from searchengine.store.records import ImageDetail, IndexedFile, NewImage

__all__ = ["Library", "ImageDetail", "IndexedFile", "NewImage", "Recorded", "ReconcileReport", "model_info"]
