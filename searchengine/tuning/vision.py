"""What fine-tuning trains of the ViT (`finetune --train-vision N`): its last N blocks and the
layer norm after them, the rest frozen.

The ViT is split where the trained part starts. `frozen` runs the part before (once per image,
into the feature cache, so training stays cached); `tail` runs the trained part on those
outputs, with gradients. `tail(frozen(x))` is the ViT's output (`RetrievalModel.vit`); with
N = 0 `frozen` is the whole ViT and `tail` passes its output through, as before.

Learning rates decay layer by layer, as LAVIS fine-tunes EVA's ViT for BLIP-2: the block k
places below the top trains at `decay ** (k + 1)` times the Q-Former's rate (the layer norm at
`decay`), so the blocks nearest the pixels move least.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from searchengine.errors import FinetuneError

if TYPE_CHECKING:
    import torch

    from searchengine.models.retrieval import RetrievalModel

PREFIX = "vision_model."


class VisionSplit:
    def __init__(self, model: "RetrievalModel", trained_blocks: int) -> None:
        self.model = model
        self.vision = model.model.vision_model
        self.blocks = self.vision.encoder.layers
        self.depth = len(self.blocks)
        if not 0 <= trained_blocks <= self.depth:
            raise FinetuneError(f"--train-vision must be between 0 and {self.depth}, the ViT's blocks; got {trained_blocks}")
        self.trained = trained_blocks

    def frozen(self, pixel_values: "torch.Tensor") -> "torch.Tensor":
        """Pixel values -> the frozen part's output [N, P, W] (no gradients)."""
        import torch

        if not self.trained:
            return self.model.vit(pixel_values)
        with torch.inference_mode():
            hidden = self.vision.embeddings(pixel_values.to(self.model.device, dtype=self.model.vision_dtype))
            for block in self.blocks[: self.depth - self.trained]:
                hidden = block(hidden)
            return hidden

    def tail(self, hidden: "torch.Tensor") -> "torch.Tensor":
        """The frozen part's output -> the ViT's output, through the trained blocks."""
        if not self.trained:
            return hidden
        for block in self.blocks[self.depth - self.trained:]:
            hidden = block(hidden)
        return self.vision.post_layernorm(hidden)

    def is_trained(self, name: str) -> bool:
        """Whether a parameter of the model (by its name in `named_parameters`) is trained."""
        if not name.startswith(PREFIX):
            return True
        return self.scale(name) is not None

    def scale(self, name: str, decay: float = 1.0) -> float | None:
        """The learning-rate factor of a ViT parameter, None where it stays frozen."""
        rest = name[len(PREFIX):]
        if not self.trained:
            return None
        if rest.startswith("post_layernorm."):
            return decay
        if rest.startswith("encoder.layers."):
            index = int(rest.split(".")[2])
            below_top = self.depth - 1 - index
            return decay ** (below_top + 1) if below_top < self.trained else None
        return None

    def groups(self, decay: float) -> Iterator[tuple[str, "torch.nn.Parameter", float]]:
        """(name, parameter, learning-rate factor) of every trained parameter; the rest of the
        ViT is frozen here (requires_grad off)."""
        for name, p in self.model.model.named_parameters():
            if not name.startswith(PREFIX):
                yield name, p, 1.0
                continue
            factor = self.scale(name, decay)
            p.requires_grad_(factor is not None)
            if factor is not None:
                yield name, p, factor
