"""L2. Vector indexes over ITC embeddings: the exact one (`exact`), the approximate tier
(`ann`), the GPU copy (`gpu`), the on-disk ViT feature cache, and synthetic vectors to measure them."""
