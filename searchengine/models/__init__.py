"""L1. The models and how they are loaded: BLIP-2 retrieval (`retrieval`: ITC and ITM),
the captioner, visual question answering (`vqa`), all three through `loading` (device, dtype,
one `load_pretrained`), the ONNX text encoder, the model hub, and tiny random models built
offline (`tiny`)."""
