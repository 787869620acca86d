"""Measuring and improving the retrieval model on captioned images: `datasets` (the sets),
`evaluation` (`searchengine eval`), `finetune` (`searchengine finetune`), `cli` (their
commands). Built on the core (`searchengine`) and the indexer's stages, never imported by them."""
