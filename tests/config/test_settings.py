"""Settings decided where they are read: an empty API key is no key."""

from __future__ import annotations

import pytest

from searchengine.config.settings import Settings


@pytest.mark.parametrize("blank", ["", "   ", "\t"])
def test_an_empty_api_key_is_no_key(monkeypatch, tmp_path, blank):
    """compose.yaml passed `SEARCHENGINE_API_KEY: ''` when the variable was unset: the server
    then guarded with '' and `/api/stats` treated the empty key as set."""
    assert Settings(data_dir=tmp_path, api_key=blank).api_key is None
    monkeypatch.setenv("SEARCHENGINE_API_KEY", blank)
    assert Settings(data_dir=tmp_path).api_key is None


def test_a_real_key_is_kept_and_never_shown(monkeypatch, tmp_path):
    monkeypatch.setenv("SEARCHENGINE_API_KEY", "s3cret")
    s = Settings(data_dir=tmp_path)
    assert s.api_key is not None and s.api_key.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(s)
