"""Where a model's files come from: a local directory, the local hub cache, or the hub.

`locate` answers before any weights are read, and fast: a model named by hub id that is not
in the local cache while the hub cannot be reached fails in about a second with one line
that says why and what to do, instead of the hub client's retries (1+2+4+8+8 s per file).
A cached model loads with no network at all. `HF_HUB_OFFLINE=1` is respected.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import TextIO

from searchengine.errors import ModelLoadError

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "true", "yes", "on"}



def ways_forward(what: str, network: str = "connect to a network and run it again") -> str:
    """What a user can do about a model that cannot be had, for the one line it gets."""
    if what == "caption model":
        return f"{network}, name a local captioner directory with --caption-model DIR, or index without captions with --no-captions"
    return f"{network}, name a local model directory with --model DIR, or try everything with tiny random models (`searchengine make-tiny-model DIR`)"


@dataclass(frozen=True)
class ModelSource:
    """What to hand `from_pretrained`: a directory or a hub id, and whether to stay offline."""

    source: str
    local_files_only: bool = False


def looks_local(name: str) -> bool:
    """A path rather than a hub id (`owner/name`)."""
    return name.startswith(("/", "./", "../", "~")) or os.path.isdir(name) or name.count("/") > 1


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or "https://huggingface.co"


def cached(repo_id: str) -> bool:
    """True when the hub cache holds this model's config (a complete earlier download)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - a malformed id or cache is "not cached"
        return False


_probe: tuple[float, str | None] | None = None  # (when, answer) of the last probe


def hub_unreachable_reason(timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the hub answers (any HTTP status); else why not, in a few words.

    One request with a short timeout and no retries, through the hub client's own HTTP
    session, so proxies configured for it are used. The answer is kept for a minute: a
    command that locates two models probes once.
    """
    global _probe
    if _probe is not None and time.monotonic() - _probe[0] < 60:
        return _probe[1]
    answer = _probe_hub(timeout_s)
    _probe = (time.monotonic(), answer)
    return answer


def _probe_hub(timeout_s: float) -> str | None:
    from huggingface_hub import get_session

    try:
        get_session().head(endpoint(), timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 - every transport failure means "unreachable"
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Name or service not known" in text or "nodename nor servname" in text or "getaddrinfo" in text:
            return "no network (its name cannot be resolved)"
        if "timed out" in text.lower() or "timeout" in type(e).__name__.lower():
            return f"no answer within {timeout_s:.0f} s"
        return text
    return None


def locate(name: str, what: str = "model") -> ModelSource:
    """Where to load `name` from, or ModelLoadError saying why it cannot be had.

    `what` names the model in messages ("model", "caption model").
    """
    if looks_local(name):
        path = os.path.expanduser(name)
        if not os.path.isdir(path):
            raise ModelLoadError(f"{what} directory {name!r} does not exist")
        return ModelSource(path, local_files_only=True)
    if cached(name):
        if offline():
            return ModelSource(name, local_files_only=True)
        reason = hub_unreachable_reason()
        if reason is not None:
            log.info("the hub is unreachable (%s); loading %s from the local cache", reason, name)
        return ModelSource(name, local_files_only=reason is not None)
    if offline():
        raise ModelLoadError(
            f"cannot download {what} {name!r}: HF_HUB_OFFLINE is set and it is not in the local cache; "
            + ways_forward(what, "unset HF_HUB_OFFLINE on a machine with a network")
        )
    reason = hub_unreachable_reason()
    if reason is not None:
        raise ModelLoadError(
            f"cannot download {what} {name!r}: the Hugging Face hub ({endpoint()}) cannot be reached: {reason}; "
            + ways_forward(what)
        )
    return ModelSource(name)


def prepare_loading(stream: TextIO | None = None) -> bool:
    """Before a load: transformers' own messages and loading bars quiet, the hub's download
    progress bars on when `stream` (stderr) is a terminal, off otherwise. True if on.

    transformers' `disable_progress_bar` also turns off the hub's download bars, which left a
    first run downloading 5.7 GB in silence; so the hub's are switched back on after it.
    """
    import huggingface_hub.utils as hub_utils
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    stream = stream or sys.stderr
    tty = bool(getattr(stream, "isatty", lambda: False)())
    if tty:
        hub_utils.enable_progress_bars()
    return tty
