"""Where a query matches a photo (issue 31): Grad-CAM over ITM points at the thing the words
name, computes ITM exactly as the fused attention does, and runs in bfloat16 too."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from searchengine.models.explain import cross_attentions, grad_cam
from searchengine.models.retrieval import RetrievalModel
from tests.trained import OBJECT_SIZE, two_squares

PICTURES = 50


def peak_in(grid: np.ndarray, box, size: int = OBJECT_SIZE) -> bool:
    """Whether the grid's strongest patch has its centre inside the box (x0, y0, x1, y1)."""
    rows, columns = grid.shape
    row, column = np.unravel_index(int(np.argmax(grid)), grid.shape)
    x, y = (column + 0.5) * size / columns, (row + 0.5) * size / rows
    return box[0] <= x < box[2] and box[1] <= y < box[3]


@pytest.fixture(scope="module")
def pictures():
    rng = np.random.default_rng(123)  # not the training pictures' seed
    return [two_squares(rng) for _ in range(PICTURES)]


def pointing(model: RetrievalModel, pictures) -> tuple[float, list[np.ndarray]]:
    hits, grids = 0, []
    for picture, boxes in pictures:
        vit = model.vit(model.preprocess([picture]))
        for colour, box in boxes.items():
            heat = grad_cam(model, f"a {colour} square", vit)
            grids.append(heat.grid)
            hits += peak_in(heat.grid, box)
    return hits / (2 * len(pictures)), grids


def test_the_map_of_each_square_peaks_inside_it(object_model_dir, pictures):
    model = RetrievalModel.load(str(object_model_dir), device="cpu", dtype="float32")
    accuracy, grids = pointing(model, pictures)
    print(f"pointing accuracy {accuracy:.2f} over {2 * PICTURES} maps")
    # Measured 0.88; the two squares cover about a fifth of a picture, so a map that ignored
    # the words would land in the right one about 0.1 to 0.5 of the time.
    assert accuracy >= 0.8, accuracy
    assert all(g.shape == (8, 8) and g.max() == 1.0 and g.min() >= 0 for g in grids)
    # The words decide it: the two squares' maps of one picture peak in different places.
    different = sum(int(np.argmax(a)) != int(np.argmax(b)) for a, b in zip(grids[::2], grids[1::2]))
    assert different >= 0.8 * PICTURES, different


def test_it_computes_itm_as_the_fused_attention_does(object_model_dir, pictures):
    model = RetrievalModel.load(str(object_model_dir), device="cpu", dtype="float32")
    picture, boxes = pictures[0]
    vit = model.vit(model.preprocess([picture]))
    colour = next(iter(boxes))
    heat = grad_cam(model, f"a {colour} square", vit)
    assert heat.itm == pytest.approx(float(model.itm(f"a {colour} square", vit)[0]), abs=1e-6)
    assert 0.5 < heat.itm <= 1.0  # the square is there
    assert not any(m._forward_hooks for m in cross_attentions(model))  # nothing left hooked
    absent = next(c for c in ("red", "green", "blue", "yellow") if c not in boxes)
    assert grad_cam(model, f"a {absent} square", vit).itm < 0.5


def test_in_bfloat16_it_points_where_float32_does(object_model_dir, pictures):
    """The bf16 path (what `dtype = auto` picks on a GPU and on a CPU with avx512_bf16): the
    maps' peaks agree with float32's on most pictures, and it points as well."""
    fp32 = RetrievalModel.load(str(object_model_dir), device="cpu", dtype="float32")
    bf16 = RetrievalModel.load(str(object_model_dir), device="cpu", dtype="bfloat16")
    assert bf16.vision_dtype == torch.bfloat16
    few = pictures[:20]
    accuracy32, grids32 = pointing(fp32, few)
    accuracy16, grids16 = pointing(bf16, few)
    same = np.mean([int(np.argmax(a)) == int(np.argmax(b)) for a, b in zip(grids32, grids16)])
    print(f"bf16: pointing {accuracy16:.2f} (fp32 {accuracy32:.2f}), the same peak on {same:.2f} of the maps")
    assert same >= 0.8 and accuracy16 >= accuracy32 - 0.1, (same, accuracy16, accuracy32)
