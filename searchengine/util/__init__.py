"""L0. Small tools with no knowledge of images or models: durable writes (`durable`), the
data directory's locks (`locks`), the micro-batcher, sealed file caches, metrics, near names."""
