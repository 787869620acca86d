"""A tiny BLIP-2 retrieval model *trained* for a few seconds to see colour, for ranking tests.

Random weights rank at random, so no test of ranking quality can use them. This model is the
tiny architecture of `searchengine.models.tiny`, trained with BLIP-2's own two heads (ITC: contrastive
over a batch; ITM: matched vs. mismatched pairs) on noisy single-colour pictures captioned
with the colour and some other word ("a red dog", "car blue", ...). It learns what a real model knows about a photo (its colour here) and
nothing about the other words, which in the tests only file names carry.

Training takes seconds, but every test run would pay them, so `colour_model()` keeps the
trained weights in a cache folder keyed by everything that decides them: this file's and
`searchengine/models/tiny.py`'s source, the library versions, the steps, the seed and torch's thread
count (its float sums, and so the weights, depend on it). A miss (a fresh clone, an edit to
either file) trains again; delete the folder to force it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 215, 30)}
FILLER = ["dog", "cat", "bird", "photo", "picture", "horse", "car", "tree"]
# 100 steps of batch 16: the hybrid tests pass with seeds 0-4 from 60 steps up and fail at 30
# (MAP hybrid 0.90 or lower), so 100 leaves a margin.
STEPS = 100


def colour_picture(colour: str, rng: np.random.Generator, size: int = 48) -> Image.Image:
    base = np.array(COLOURS[colour], dtype=float)
    return Image.fromarray(np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8))


def untrained(out_dir: Path, seed: int, image_size: int | None = None):
    """(the tiny model, its processor, a generator), random from `seed`, torch seeded too."""
    import torch
    from transformers import AutoProcessor, Blip2ForImageTextRetrieval

    from searchengine.models.tiny import build_tiny_model

    base = build_tiny_model(Path(out_dir) / "untrained", seed=seed, image_size=image_size)
    model = Blip2ForImageTextRetrieval.from_pretrained(base)
    processor = AutoProcessor.from_pretrained(base)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    return model, processor, rng


def train_colour_model(out_dir: Path, *, steps: int = STEPS, seed: int = 0) -> Path:
    import torch
    from torch.nn import functional as F

    model, processor, rng = untrained(out_dir, seed)
    names = list(COLOURS)
    tok = processor.tokenizer

    def text(colour: str) -> str:  # the colour word with any other word around it
        filler = FILLER[rng.integers(0, len(FILLER))]
        return [f"a {colour} {filler}", f"{colour} {filler}", f"{filler} {colour}", colour][rng.integers(0, 4)]

    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(steps):
        idx = rng.integers(0, len(names), 16)
        pixels = processor.image_processor([colour_picture(names[i], rng) for i in idx], return_tensors="pt")["pixel_values"]
        prompts = tok([text(c) for c in names], padding=True, return_tensors="pt")
        itc = model(pixel_values=pixels, **prompts, use_image_text_matching_head=False).logits_per_image
        loss = F.cross_entropy(itc * 10, torch.from_numpy(idx))
        match = rng.integers(0, 2, 16)
        shown = np.where(match == 1, idx, (idx + rng.integers(1, len(names), 16)) % len(names))
        texts = tok([text(names[i]) for i in shown], padding=True, return_tensors="pt")
        itm = model(pixel_values=pixels, **texts, use_image_text_matching_head=True).logits_per_image
        loss = loss + F.cross_entropy(itm, torch.from_numpy(match))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return saved(model, processor, out_dir)


def saved(model, processor, out_dir: Path) -> Path:
    """The trained model and its processor, written to `out_dir`/trained."""
    model.eval()
    out = Path(out_dir) / "trained"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def cache_root() -> Path:
    return Path(os.environ.get("SEARCHENGINE_TEST_CACHE") or Path.home() / ".cache" / "searchengine-tests")


def model_key(*extra) -> str:
    """What decides a trained model's weights: this file's and random_models' source, the
    library versions, torch's thread count (its float sums depend on it) and `extra`."""
    import PIL
    import torch
    import transformers

    h = hashlib.sha256()
    for source in (Path(__file__), Path(__file__).resolve().parents[1] / "searchengine" / "models" / "tiny.py"):
        h.update(source.read_bytes())
    versions = (torch.__version__, transformers.__version__, np.__version__, PIL.__version__)
    h.update(repr((versions, extra, torch.get_num_threads())).encode())
    return h.hexdigest()


def colour_model_key(*, steps: int = STEPS, seed: int = 0) -> str:
    return model_key(steps, seed)


def cached(name: str, key: str, train) -> Path:
    """`train(work_dir) -> model dir`, run once per key: from the cache, or trained now and cached."""
    root = cache_root()
    final = root / f"{name}-{key[:24]}"
    if (final / "model.safetensors").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".training-", dir=root))
    try:
        trained = train(work)
        try:  # one rename: a reader sees the whole model or none; a concurrent run's copy wins ties
            trained.rename(final)
        except OSError:
            if not (final / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def colour_model(*, steps: int = STEPS, seed: int = 0) -> Path:
    """The trained colour model's folder: from the cache, or trained now and cached."""
    return cached("colour-model", colour_model_key(steps=steps, seed=seed), lambda work: train_colour_model(work, steps=steps, seed=seed))


# -- a model that tells photos apart ------------------------------------------------------------
# Random tiny weights score every photo within a few hundredths of every other (0.95-0.999),
# so near-duplicate tests need a model that, like BLIP-2, sees what a photo shows and not how
# it was saved. This one is the tiny architecture at 64 px, trained contrastively (SimCLR's
# recipe, on the image-to-image score of `queries.image_similarity`) to match two random
# edits of a photo (crop to 80-100%, brightness 0.75-1.3, JPEG quality 40-95) against the
# other photos of the batch. ~10 s for a dozen photos; cached like the colour model.

PHOTO_STEPS = 200


def photo_augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    import io

    from PIL import ImageEnhance

    w, h = image.size
    s = rng.uniform(0.8, 1.0)
    cw, ch = int(w * s), int(h * s)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    image = ImageEnhance.Brightness(image.crop((x, y, x + cw, y + ch))).enhance(rng.uniform(0.75, 1.3))
    if rng.random() < 0.5:
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=int(rng.integers(40, 95)))
        image = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return image


def train_photo_model(out_dir: Path, photos: list[Path], *, steps: int = PHOTO_STEPS, seed: int = 0) -> Path:
    import torch
    from torch.nn import functional as F
    from transformers import AutoProcessor, Blip2ForImageTextRetrieval

    from searchengine.models.tiny import build_tiny_model

    # 64 patches of 8 px: 32 px shows too little of a photo.
    base = build_tiny_model(Path(out_dir) / "untrained", seed=seed, image_size=64)
    model = Blip2ForImageTextRetrieval.from_pretrained(base)
    processor = AutoProcessor.from_pretrained(base)
    small = []
    for path in photos:
        image = Image.open(path).convert("RGB")
        image.thumbnail((128, 128))
        small.append(image)
    rng = np.random.default_rng(seed)

    def features(pixels):
        vit = model.vision_model(pixel_values=pixels).last_hidden_state
        queries = model.query_tokens.expand(len(pixels), -1, -1)
        mask = torch.ones(vit.shape[:-1], dtype=torch.long)
        out = model.qformer(query_embeds=queries, encoder_hidden_states=vit, encoder_attention_mask=mask)
        return F.normalize(model.vision_projection(out.last_hidden_state), dim=-1)

    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    labels = torch.arange(len(small))
    model.train()
    for _ in range(steps):
        a, b = (
            features(processor.image_processor([photo_augment(im, rng) for im in small], return_tensors="pt")["pixel_values"])
            for _ in range(2)
        )
        sims = torch.einsum("iqd,jpd->ijqp", a, b).amax(-1).mean(-1)  # image_similarity, every pair
        loss = F.cross_entropy(sims / 0.1, labels) + F.cross_entropy(sims.T / 0.1, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return saved(model, processor, out_dir)


def photo_model(photos: list[Path], *, steps: int = PHOTO_STEPS, seed: int = 0) -> Path:
    """A tiny model trained to tell these photos apart (see above); cached."""
    names = [(p.name, p.stat().st_size) for p in photos]
    return cached("photo-model", model_key("photo", names, steps, seed), lambda work: train_photo_model(work, photos, steps=steps, seed=seed))


# -- a model that tells where things are ------------------------------------------------------------
# For "where a query matches" (searchengine/models/explain.py): the tiny architecture at 64 px
# (8 x 8 patches), trained with ITC and ITM on pictures of two coloured squares on grey,
# captioned with one of the two colours (matched) or a colour not in the picture (not). The
# colour model above saw only one colour filling each picture, so its ITM has no reason to
# look at one part of a picture rather than another.

OBJECT_STEPS = 1000  # ITM near 1 on the matched pairs, and the maps point (0.88); at 300 neither
OBJECT_SIZE = 64


def two_squares(rng: np.random.Generator, size: int = OBJECT_SIZE, side: tuple[int, int] = (16, 27)):
    """(picture, {colour: box}) with two squares of different colours, one in each half
    (left and right, or top and bottom), anywhere within it."""
    names = list(COLOURS)
    pixels = np.full((size, size, 3), 128.0) + rng.normal(0, 12, (size, size, 3))
    boxes: dict[str, tuple[int, int, int, int]] = {}
    across = rng.random() < 0.5  # halves side by side, else one above the other
    for half, colour in enumerate(rng.choice(len(names), 2, replace=False)):
        s = int(rng.integers(*side))
        along, within = int(rng.integers(0, size // 2 - s + 1)) + half * size // 2, int(rng.integers(0, size - s + 1))
        x, y = (along, within) if across else (within, along)
        pixels[y:y + s, x:x + s] = np.array(COLOURS[names[colour]], float) + rng.normal(0, 12, (s, s, 3))
        boxes[names[colour]] = (x, y, x + s, y + s)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), boxes


def train_object_model(out_dir: Path, *, steps: int = OBJECT_STEPS, seed: int = 0) -> Path:
    import torch
    from torch.nn import functional as F

    model, processor, rng = untrained(out_dir, seed, OBJECT_SIZE)
    names = list(COLOURS)
    tok = processor.tokenizer
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(steps):
        pictures = [two_squares(rng) for _ in range(16)]
        pixels = processor.image_processor([p for p, _ in pictures], return_tensors="pt")["pixel_values"]
        match = rng.integers(0, 2, 16)
        shown = []
        for (_, boxes), m in zip(pictures, match):
            present = list(boxes)
            absent = [c for c in names if c not in boxes]
            shown.append(present[rng.integers(0, 2)] if m else absent[rng.integers(0, len(absent))])
        texts = tok([f"a {c} square" for c in shown], padding=True, return_tensors="pt")
        itm = model(pixel_values=pixels, **texts, use_image_text_matching_head=True).logits_per_image
        loss = F.cross_entropy(itm, torch.from_numpy(match))
        # ITC on the matched pairs: each query vector may take one square
        prompts = tok([f"a {c} square" for c in names], padding=True, return_tensors="pt")
        itc = model(pixel_values=pixels, **prompts, use_image_text_matching_head=False).logits_per_image  # [16, 4]
        present = torch.tensor([[c in boxes for c in names] for _, boxes in pictures], dtype=torch.float32)
        loss = loss + F.binary_cross_entropy_with_logits(itc * 10 - 5, present)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return saved(model, processor, out_dir)


def object_model(*, steps: int = OBJECT_STEPS, seed: int = 0) -> Path:
    """The two-squares model's folder: from the cache, or trained now and cached."""
    return cached("object-model", model_key("objects", steps, seed), lambda work: train_object_model(work, steps=steps, seed=seed))
