"""Where ITM re-ranking gets each candidate's ViT output: the feature cache, or the files.

On a CPU the indexer keeps an fp16 copy of every image's ViT output (re-running the ViT costs
seconds per candidate there); on a GPU it keeps none (milliseconds). `itm_features` picks:
"cache" reads the cache where it has an entry and re-runs the ViT for the rest; "recompute"
always re-runs it. Re-run outputs go into the cache where the settings keep one. See
benchmarks/query_latency.py.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from searchengine.errors import BadImageError
from searchengine.media.imageio import decode_image, read_file
from searchengine.library import Library
from searchengine.models.retrieval import RetrievalModel
from searchengine.config.settings import Settings

if TYPE_CHECKING:
    import torch

    from searchengine.store.records import ImageRecord

log = logging.getLogger(__name__)


class ItmFeatures:
    def __init__(self, model: RetrievalModel, library: Library, settings: Settings) -> None:
        self.model = model
        self.library = library
        self.settings = settings
        self.use_cache = settings.itm_features != "recompute"
        self.fill_cache = settings.writes_feature_cache(model.device) and library.writable

    def get(self, ids: list[int], records: dict[int, ImageRecord]) -> dict[int, "torch.Tensor"]:
        """ViT outputs of these images, where they can be had (an image whose files cannot be
        read has none). Records read to find the files are left in `records`.

        Cached features are fp16 (ITM differs from the reference by at most ~4e-4 for them);
        re-run ones stay in the model's dtype, so a candidate with no cache entry is scored
        exactly as the reference scores it.
        """
        import torch

        features: dict[int, torch.Tensor] = {}
        missing = []
        for image_id in ids:
            arr = self.library.cached_vit(image_id) if self.use_cache else None
            if arr is None:
                missing.append(image_id)
            else:
                features[image_id] = torch.from_numpy(np.array(arr))  # a private, writable copy
        if missing:
            records.update(self.library.catalog.images([i for i in missing if i not in records]))
            features.update(self._recompute(missing, records))
        return features

    def _recompute(self, ids: list[int], records: dict[int, ImageRecord]) -> dict[int, "torch.Tensor"]:
        """ViT outputs re-run from the files, in the model's dtype (and into the cache, as fp16,
        where the settings keep one)."""

        def load(image_id: int):
            rec = records.get(image_id)
            for path in rec.paths if rec else []:
                try:
                    return decode_image(read_file(path), max_pixels=self.settings.max_image_pixels).image
                except BadImageError as e:
                    log.warning("cannot re-rank %s: %s", path, e)
            return None

        with ThreadPoolExecutor(self.settings.decode_threads) as pool:
            loaded = list(zip(ids, pool.map(load, ids)))
        got = [image_id for image_id, im in loaded if im is not None]
        images = [im for _, im in loaded if im is not None]
        if not images:
            return {}
        vit = self.model.vit(self.model.preprocess(images)).cpu()
        if self.fill_cache:
            self.library.cache_vit(got, vit.float().numpy().astype(np.float16))
        return {image_id: vit[j] for j, image_id in enumerate(got)}
