"""L5. Measuring and improving the retrieval model on captioned images: `datasets` (the sets),
`evaluation` (`searchengine eval`), `finetune` (`searchengine finetune`). Their commands are in
`searchengine.app.tuning_cli`."""
