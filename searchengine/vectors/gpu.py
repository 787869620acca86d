"""A GPU copy of the vector index, for searches, where FAISS has GPU support (faiss-gpu, the
`[gpu]` extra) and a CUDA device is present.

The CPU index stays the one that is written, saved, reconciled and rebuilt. The GPU copy is
made from it when the library opens, after each save (every `save_every_s` while writes come)
and after a rebuild; between a write and the next copy, searches run on the CPU, so a result
never misses a write. Searches with a filter run on the CPU too (FAISS's GPU indexes take no
id selector), and so do those asking more vectors than a GPU search selects (k <= 2048).
Without GPU support, one log line says so and everything runs on the CPU.
"""

from __future__ import annotations

import logging

from searchengine.vectors.exact import faiss_lib

log = logging.getLogger(__name__)


def gpu_count() -> int:
    """CUDA devices FAISS can use (0 with faiss-cpu)."""
    faiss = faiss_lib()
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except Exception:  # noqa: BLE001 - a broken CUDA install counts as none
        return 0


def _clone_to_gpu(index, resources):
    faiss = faiss_lib()
    options = faiss.GpuClonerOptions()
    options.useFloat16 = True  # the vectors are float16 values (as stored): no loss
    return faiss.index_cpu_to_gpu(resources, 0, index, options)


class GpuMirror:
    """The GPU copy of one library's index (or nothing, where there is no GPU)."""

    def __init__(self, wanted: str) -> None:
        self._resources = None
        self._copy = None
        self._source = None  # the CPU index object the copy was made of
        self._version = -1  # the library's write count when it was made
        self.enabled = False
        if wanted == "cpu":
            return
        if gpu_count() == 0:
            if wanted == "gpu":
                log.warning("vector search on the GPU was asked for, but FAISS has no GPU here "
                            "(pip install 'searchengine[gpu]' and a CUDA device); searching on the CPU")
            else:
                log.info("FAISS has no GPU here (faiss-cpu, or no CUDA device): vector search runs on the CPU")
            return
        self._resources = faiss_lib().StandardGpuResources()
        self.enabled = True

    def refresh(self, index, version: int) -> None:
        """Copy `index` (its FAISS index) to the GPU, as of the library's `version`."""
        if not self.enabled or index is None:
            return
        try:
            self._copy = _clone_to_gpu(index.index, self._resources)  # nprobe comes along
        except Exception as e:  # noqa: BLE001 - e.g. out of GPU memory: the CPU answers
            log.warning("cannot copy the vector index to the GPU (%s); searching on the CPU", e)
            self._copy = None
            self.enabled = False
            return
        self._source, self._version = index, version

    def copy_for(self, index, version: int, n_vectors: int, filtered: bool):
        """The GPU copy, where it is current for this index and this search can run on it."""
        if self._copy is None or index is not self._source or version != self._version or filtered:
            return None
        if n_vectors > getattr(faiss_lib(), "GPU_MAX_SELECTION_K", 2048):
            return None
        return self._copy
