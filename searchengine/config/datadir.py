"""Where an index lives when no one says: a module with no imports beyond the standard
library, so the entry point can find the data dir before pydantic loads."""

from __future__ import annotations

import os
from pathlib import Path


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "searchengine"
