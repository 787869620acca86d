"""Self-hosted semantic image search on BLIP-2 (ITC retrieval, ITM re-ranking)."""

__version__ = "0.1.0"
