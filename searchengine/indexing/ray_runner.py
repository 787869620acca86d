"""The Ray Data runner (`searchengine index --runner ray`): the stages of `searchengine.indexing.stages` on a
Ray cluster, the writes on this machine.

    Ray tasks: list each folder (all folders at once)
    driver: which listed files are new or changed, and the set of contents the library has
      -> Ray tasks on CPU workers: read + hash; known content stops here; decode
      -> an actor pool (a GPU each where the cluster has GPUs): embed, then caption
      -> driver: Library.write_batch, batch by batch, as the local runner commits

The workers read the photos themselves, so every folder must be on a filesystem that every
Ray node mounts at the same path (an NFS or SMB share, a cluster filesystem); a run checks
that first and names the first path a worker cannot read. The actors load the models by the
names the index records (a hub id, found in each node's hub cache or downloaded, or a
directory that every node has).

Nothing is written twice: Ray retries the task of a worker that dies (and restarts a dead
actor), and the driver links content it has already written in this run instead of writing
it again (a file copied twice in one run is embedded twice, on different workers, and
written once). Only the driver touches the Library.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from searchengine.indexing.batches import Batch, Sorter
from searchengine.indexing.scan import FileEntry
from searchengine.indexing.stages import CaptionStage, Decoded, DecodeStage, EmbedStage, Known, Read, ReadStage
from searchengine.errors import SearchEngineError

if TYPE_CHECKING:
    from searchengine.indexing.pipeline import Indexer, Summary
    from searchengine.config.settings import Settings

log = logging.getLogger(__name__)

# Retries of a map task whose worker died, and restarts of a dead actor.
RETRIES = 3


def _objects(items: Sequence) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = list(items)
    return out


def check_installed() -> None:
    import importlib

    try:
        importlib.import_module("ray.data")
    except ImportError:
        raise SearchEngineError("--runner ray needs Ray Data: pip install 'searchengine[ray]' (or pip install 'ray[data]')") from None


RAY_CLIENT_REFUSED = (
    "--ray-address {address}: Ray Data does not run through Ray Client (ray://), so an index run cannot "
    "drive a cluster from outside it; run the command on a node of the cluster, or on a machine that "
    "joins it first (`ray start --address HEAD:6379`), with --ray-address auto"
)


def connect(address: str | None) -> None:
    """Join the cluster at `address` ("auto": the one this machine belongs to, as a node of it;
    "HOST:6379": the head's address, from a node), or start a local instance on this machine
    when there is none to join. A Ray Client address (ray://) was refused by `RayRunner`."""
    import ray

    if ray.is_initialized():
        quiet()
        return
    # Ray's core logs notices to this process's stderr (about actor restarts, say); errors
    # reach the command as exceptions. RAY_BACKEND_LOG_LEVEL set by the user wins.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    try:
        ray.init(address=address or None, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError) as e:
        raise SearchEngineError(f"cannot join the Ray cluster at {address!r}: {e}") from None
    quiet()


def quiet() -> None:
    """Ray Data's own progress bars and per-stage logs off: the command has its own."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    if hasattr(context, "enable_operator_progress_bars"):
        context.enable_operator_progress_bars = False
    for name in ("ray.data", "ray"):  # its notices (progress bars off, deprecations) are not the user's
        logging.getLogger(name).setLevel(logging.ERROR)


_known_sets: dict[str, frozenset] = {}


def _known(ref) -> frozenset:
    """The set of known contents behind `ref`, fetched once per worker process (a library of a
    million images makes a set of ~100 MB: put in the object store once, not sent per task)."""
    import ray

    key = ref.hex()
    if key not in _known_sets:
        _known_sets.clear()
        _known_sets[key] = ray.get(ref)
    return _known_sets[key]


@dataclass(frozen=True)
class ReadDecode:
    """A batch of FileEntry -> Known | Decoded | Failed, on a CPU worker. Content the library
    already has (`known`: an object reference to a frozenset of hashes) is not decoded."""

    read: ReadStage
    decode: DecodeStage
    known: object

    def __call__(self, batch: dict) -> dict:
        known = _known(self.known)
        out = []
        for entry in batch["entry"]:
            r = self.read(entry)
            out.append(Known(r.entry, r.sha256) if isinstance(r, Read) and r.sha256 in known else self.decode(r))
        return {"item": _objects(out)}


class ModelActor:
    """Embeds (and captions) the decoded images of a batch; everything else passes through.
    The pixels stay on the worker: only vectors, the ViT output where the feature cache
    keeps it, the thumbnail and the metadata go back to the driver."""

    def __init__(self, settings: "Settings", model: str, captioner: str | None, keep_vit: bool, loaders: "Loaders") -> None:
        loaded = loaders.load_model(settings, model)
        self.embed = EmbedStage(loaded, keep_vit=keep_vit)
        cap = loaders.load_captioner(settings, captioner)
        self.caption = CaptionStage(cap) if cap is not None else None

    def __call__(self, batch: dict) -> dict:
        items = list(batch["item"])
        todo = [i for i, x in enumerate(items) if isinstance(x, Decoded)]
        embedded = self.embed([items[i] for i in todo])
        if embedded and self.caption is not None:
            embedded = self.caption(embedded)
        for i, e in zip(todo, embedded):
            items[i] = replace(e, item=replace(e.item, pixels=None, caption_pixels=None))
        return {"item": _objects(items)}


def bound_actor(settings: "Settings", model: str, captioner: str | None, keep_vit: bool, loaders: "Loaders") -> type:
    """ModelActor with its arguments in the class itself, so that a restarted actor never
    depends on constructor arguments kept in the object store (ray-project/ray#53727)."""

    class Bound(ModelActor):
        def __init__(self) -> None:
            super().__init__(settings, model, captioner, keep_vit, loaders)

    return Bound


def unreadable_on_workers(paths: Sequence[str]) -> str | None:
    """The first of `paths` that a Ray worker cannot read, or None."""
    import ray

    @ray.remote(num_cpus=0)
    def first_unreadable(paths: list[str]) -> str | None:
        return next((p for p in paths if not os.access(p, os.R_OK)), None)

    return ray.get(first_unreadable.remote(list(paths)))


@dataclass(frozen=True)
class Loaders:
    """How a model actor loads its models: module-level functions (pickled by reference, so a
    worker imports them), handed in by the composition root (`searchengine.app.wiring`), which
    the indexing layer does not import."""

    load_model: Callable[["Settings", str], object]
    load_captioner: Callable[["Settings", str | None], object]


class RayRunner:
    """Drives an Indexer's stages on Ray (see the module's docstring)."""

    def __init__(self, settings: "Settings", loaders: Loaders, address: str | None = None, *, actors: int = 0,
                 read_batch: int = 16) -> None:
        # Ray Data's streaming executor fails through Ray Client (`'Worker' object has no
        # attribute 'core_worker'`, Ray 2.x): refused before any model loads. Ray reads
        # $RAY_ADDRESS where the address is none or auto.
        effective = os.environ.get("RAY_ADDRESS", "") if address in (None, "auto") else address
        if effective.strip().lower().startswith("ray://"):
            raise SearchEngineError(RAY_CLIENT_REFUSED.format(address=effective))
        self.settings = settings
        self.loaders = loaders
        self.address = address
        self.actors = actors  # 0: one per GPU in the cluster, else one per 4 CPUs (at least one)
        self.read_batch = read_batch

    def listings(self, scanner, folders: Sequence, *, on_skipped_link, **listing) -> Iterator[tuple[object, list[FileEntry]]]:
        """(folder, its files) of each folder, each listed by a Ray task on the cluster, all at
        once (the local runner lists them one after another, the same way: one scan per
        folder); the links a scan did not follow are reported here, as a local scan reports
        them."""
        import ray

        connect(self.address)

        @ray.remote(num_cpus=1, max_retries=RETRIES)
        def scan(folder) -> tuple[list[FileEntry], list[tuple[str, str]]]:
            skipped: list[tuple[str, str]] = []
            entries = list(scanner(folder, on_skipped_link=lambda path, reason: skipped.append((path, reason)), **listing))
            return entries, skipped

        refs = [scan.remote(folder) for folder in folders]
        for folder, ref in zip(folders, refs):
            entries, skipped = ray.get(ref)
            for path, reason in skipped:
                on_skipped_link(path, reason)
            yield folder, entries

    def pool(self) -> tuple[int, dict]:
        """(actors, resources per actor), sized from the cluster."""
        import ray

        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        if gpus:
            return self.actors or gpus, {"num_gpus": 1}
        return self.actors or max(1, cpus // 4), {"num_cpus": 1}

    def process(self, indexer: "Indexer", todo: list[FileEntry], summary: "Summary") -> list[tuple[str, str]]:
        import ray.data

        if not todo:
            return []
        connect(self.address)
        sample = list({os.path.dirname(e.path): e.path for e in todo}.values())[:1000]
        unreadable = unreadable_on_workers(sample)
        if unreadable is not None:
            raise SearchEngineError(
                f"the Ray workers cannot read {unreadable}: with --runner ray the folders must be on a filesystem "
                "that every Ray node mounts at the same path"
            )
        library = indexer.library
        known = ray.put(frozenset(library.catalog.all_hashes()))
        actors, per_actor = self.pool()
        captioner = indexer.captioner.name if indexer.captioner is not None else None
        ds = ray.data.from_items([{"entry": e} for e in todo], override_num_blocks=max(1, len(todo) // self.read_batch))
        with warnings.catch_warnings():
            # Bounded retries (Ray Data's default is to retry for ever, and a file that kills
            # its decoder each time would then never end the run) have no named parameter yet.
            warnings.simplefilter("ignore", DeprecationWarning)
            # The decode tasks run on CPU workers: decode "device" means their CPU there, whatever
            # device this machine's model is on.
            decode = replace(indexer.decode_stage, device="cpu")
            ds = ds.map_batches(ReadDecode(indexer.read_stage, decode, known), batch_size=self.read_batch, max_retries=RETRIES)
            ds = ds.map_batches(
                bound_actor(self.settings, indexer.model.name, captioner, indexer.embed_stage.keep_vit, self.loaders),
                batch_size=indexer.batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
                max_restarts=RETRIES, max_task_retries=RETRIES, **per_actor,
            )
        linked: list[tuple[str, str]] = []
        sorter = Sorter(indexer.batch_size, lambda failed: indexer.record_failure(failed, summary))

        def commit(b: Batch) -> None:
            indexer.commit_batch(b.new, b.known, b.failed, summary)
            linked.extend((k.entry.path, k.sha256) for k in b.known)
            indexer.report.done(len(b))

        waited = time.perf_counter()
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            summary.add_time("cluster", time.perf_counter() - waited)
            for item in batch["item"]:
                full = sorter.add(item)
                if full is not None:
                    commit(full)
            waited = time.perf_counter()
        commit(sorter.rest())
        return linked
