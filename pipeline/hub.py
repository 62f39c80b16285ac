"""Hugging Face hub ids (model.source, data.path) are fetched only when the network is there.

Without a network the libraries retry for about half a minute before failing. So before the
first hub id is loaded: with `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`, `HF_DATASETS_OFFLINE`)
set, or when the hub endpoint cannot be reached within a few seconds, the libraries are put in
offline mode for this process, so a cached id loads from the cache and any other fails at once.
"""
from __future__ import annotations

import os
import socket
import sys
from functools import lru_cache
from urllib.parse import urlparse

PROBE_SECONDS = 3.0
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _endpoint() -> tuple[str, int]:
    """The host to probe: the configured proxy, else the hub."""
    proxies = [os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")]
    url = urlparse(next((p for p in proxies if p), None) or os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


@lru_cache(maxsize=1)
def _reachable() -> bool:
    try:
        with socket.create_connection(_endpoint(), timeout=PROBE_SECONDS):
            return True
    except OSError:  # no DNS, refused, unreachable, timed out
        return False


_reason: str | None = None  # why hub ids are not fetched, once `online` said so


def online() -> bool:
    """Whether hub ids may be fetched; if not, the hub libraries are switched to their cache."""
    global _reason
    if any(_truthy(os.environ.get(v)) for v in _OFFLINE_VARS):
        _reason = "HF_HUB_OFFLINE is set"
    elif not _reachable():
        _reason = f"{_endpoint()[0]} cannot be reached"
    else:
        return True
    os.environ["HF_HUB_OFFLINE"] = "1"  # libraries imported from here on, and child processes
    # Those already imported read the variable once, at import: their flags are set directly.
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    config = sys.modules.get("datasets.config")
    if config is not None:
        config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = True
    return False


def offline_note() -> str:
    """For a message about a hub id that did not load."""
    return f"{_reason}, so only the local Hugging Face cache was searched" if _reason else ""
