"""Exceptions the core raises; the CLI (and later the API) turn them into a message or a 4xx."""


class SearchEngineError(Exception):
    """Base class: the message is written for the user and says what to do."""


class ModelLoadError(SearchEngineError):
    """The model could not be loaded, or is not a BLIP-2 retrieval model."""


class ModelMismatchError(SearchEngineError):
    """The index was built with another model than the one opened."""


class IndexNotFoundError(SearchEngineError):
    """There is no index in the data directory yet."""


class ImageNotFoundError(SearchEngineError):
    """No image has this id."""


class QueryError(SearchEngineError):
    """The query cannot be searched (empty, too long)."""


class FolderNotFoundError(QueryError):
    """A folder filter names no indexed folder (the API's 404: what it names does not exist)."""


class SchemaError(SearchEngineError):
    """The store's schema is newer than this program knows."""


class BadImageError(SearchEngineError):
    """A file could not be read or decoded as an image. `reason` is a short stable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ReadOnlyIndexError(SearchEngineError):
    """The data directory cannot be written, and the command needs to write to it."""


class StoreMissingError(SearchEngineError):
    """The store is missing or empty where an index was: never replaced by a new empty one."""


class StoreDamagedError(SearchEngineError):
    """The store cannot be read as a database (truncated, overwritten, malformed)."""


class IndexBusyError(SearchEngineError):
    """Another indexing process holds the data dir's writer lock."""


class UploadError(SearchEngineError):
    """An uploaded image that cannot be searched by: not an image, damaged, too many pixels."""


class UploadTooLarge(UploadError):
    """An upload over the size limit."""


class IndexedFileError(SearchEngineError):
    """An indexed image's file can no longer be read as an image (changed or damaged on disk)."""


class IndexedFileGone(IndexedFileError):
    """An indexed image has no file left that is still the content that was indexed (deleted,
    changed, or a link that now leads elsewhere)."""


# Raised where the work is done, kept here with the rest (the API maps them by type).


class BackupError(SearchEngineError):
    """A backup could not be made, found or restored."""


class ServiceBusy(SearchEngineError):
    """Too much work of one kind in flight: answered 503 with Retry-After."""


class VqaUnavailable(SearchEngineError):
    """No model that answers questions can be loaded; the message says why and what helps."""


class NotReady(Exception):
    """The service is still loading (or could not start: the reason is the argument)."""


class FileReadTimeout(Exception):
    """Reading an image's file took too long (a slow or hung disk)."""


class DatasetError(SearchEngineError):
    """A captioned set that cannot be read at all, or holds no usable caption."""


class FinetuneError(SearchEngineError):
    """The run cannot start (an output folder in the way, an interrupted run of other settings)."""


class Diverged(FinetuneError):
    """A fine-tune's loss stopped being a number: the learning rate is too high for this model and set."""

    def __init__(self, step: int) -> None:
        super().__init__(f"the loss is not a number at step {step + 1}: the learning rate is too high")
        self.step = step


class Stopped(Exception):
    """`Indexer.stop` was called: the run ended between two batches, with every batch before
    committed; the files of the one on its way are handled by the next run."""
