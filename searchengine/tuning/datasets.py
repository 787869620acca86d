"""Captioned image sets, for `eval` and `finetune`: which images, which captions, what was
wrong with the rest.

Two formats are read:
- JSON lines: one `{"image": "relative/path.jpg", "caption": "..."}` per line (several lines
  per image allowed; an optional `"split"` is kept);
- the Karpathy split JSON of COCO and Flickr30k: `{"images": [{"filepath": "val2014",
  "filename": "...jpg", "split": "test", "sentences": [{"raw": "..."}]}]}`.

Image paths are relative to the captions file's folder (or to `images`, where given). A line
that cannot be used (not JSON, no image or caption, an empty caption, an image that is not
there, the same image and caption twice) is counted by reason and skipped; the first few are
kept as messages. Nothing here opens an image: an unreadable one is found, and dropped with
its captions (`without`), when it is embedded.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from searchengine.errors import DatasetError

CAPTION_FILES = ("captions.jsonl",)
EXAMPLES_KEPT = 5

REASONS = {
    "not_json": "not a JSON object",
    "no_image_or_caption": 'needs "image" and "caption" strings',
    "empty_caption": "the caption is empty",
    "missing_image": "the image is not there",
    "duplicate": "the same image and caption again",
    "unreadable_image": "the image cannot be read",
}


@dataclass
class CaptionedSet:
    source: Path  # the captions file
    images: list[Path]  # absolute paths, each once
    texts: list[str]
    text_image: np.ndarray  # [T]: the index in `images` of each text's image
    skipped: Counter = field(default_factory=Counter)  # reason -> lines (or images) skipped
    messages: list[str] = field(default_factory=list)  # the first few, as the user should read them

    def __len__(self) -> int:
        return len(self.images)

    def image_texts(self) -> list[np.ndarray]:
        """For each image, the indices of its texts."""
        order = np.argsort(self.text_image, kind="stable")
        bounds = np.searchsorted(self.text_image[order], np.arange(len(self.images) + 1))
        return [order[bounds[i]:bounds[i + 1]] for i in range(len(self.images))]

    def subset(self, keep: np.ndarray) -> "CaptionedSet":
        """The images at these indices (in this order) with their texts."""
        keep = np.asarray(keep, dtype=np.int64)
        new_index = np.full(len(self.images), -1, np.int64)
        new_index[keep] = np.arange(len(keep))
        texts = [j for j in range(len(self.texts)) if new_index[self.text_image[j]] >= 0]
        return CaptionedSet(
            self.source, [self.images[i] for i in keep], [self.texts[j] for j in texts],
            new_index[self.text_image[texts]] if texts else np.zeros(0, np.int64),
            Counter(self.skipped), list(self.messages),
        )

    def without(self, bad: dict[int, str]) -> "CaptionedSet":
        """Without the images at these indices (index -> why), counted as unreadable."""
        out = self.subset(np.array([i for i in range(len(self.images)) if i not in bad], np.int64))
        for i, why in bad.items():
            out.skip("unreadable_image", f"{self.images[i]}: {why}")
        return out

    def split(self, held_out: float, seed: int = 0) -> tuple["CaptionedSet", "CaptionedSet"]:
        """(train, held out) by image, at random from `seed`; each keeps at least one image."""
        if len(self.images) < 2:
            raise DatasetError(f"{self.source}: {len(self.images)} usable image(s); a split needs at least 2")
        order = np.random.default_rng(seed).permutation(len(self.images))
        n_out = min(len(order) - 1, max(1, round(held_out * len(order))))
        return self.subset(np.sort(order[n_out:])), self.subset(np.sort(order[:n_out]))

    def skip(self, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        if len(self.messages) < EXAMPLES_KEPT:
            self.messages.append(message)

    def summary(self) -> str:
        line = f"{len(self.images)} images, {len(self.texts)} captions"
        if self.skipped:
            line += "; skipped: " + ", ".join(f"{REASONS[r]}: {n}" for r, n in sorted(self.skipped.items()))
        return line


def find_captions(data: Path) -> Path:
    """The captions file of DATA: DATA itself, or the one captions file in the folder."""
    data = Path(data).expanduser()
    if data.is_file():
        return data
    if not data.is_dir():
        raise DatasetError(f"{str(data)!r} does not exist: name a captions file (.jsonl or Karpathy .json) or its folder")
    for name in CAPTION_FILES:
        if (data / name).is_file():
            return data / name
    found = sorted(p for p in data.iterdir() if p.suffix in (".jsonl", ".json") and p.is_file())
    if len(found) == 1:
        return found[0]
    if not found:
        raise DatasetError(f"{data} holds no captions file: put the captions in {data / CAPTION_FILES[0]} (one JSON object per line)")
    raise DatasetError(f"{data} holds several captions files ({', '.join(p.name for p in found)}): name the one to use")


def load(data: Path, *, images: Path | None = None, split: str | None = None, default_split: str = "test") -> CaptionedSet:
    """The usable images and captions of DATA (see the module's doc). `split`: only the
    entries of this split (the Karpathy format's default is `default_split` where it has one:
    "test" to measure, "train" to train)."""
    source = find_captions(data)
    root = Path(images).expanduser() if images else source.parent
    if not root.is_dir():
        raise DatasetError(f"the images folder {str(root)!r} does not exist")
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {source}: {e}") from None
    out = CaptionedSet(source, [], [], np.zeros(0, np.int64))
    doc = _whole_document(text)
    pairs = _karpathy(doc["images"], source, split, default_split, out) if doc is not None else _json_lines(text, source, split, out)
    index: dict[Path, int] = {}
    seen: set[tuple[Path, str]] = set()
    text_image = []
    for where, candidates, caption in pairs:
        path = next((root / c for c in candidates if (root / c).is_file()), None)
        shown = candidates[0]
        if path is None:
            out.skip("missing_image", f"{where}: {shown}: {REASONS['missing_image']} (looked in {root})")
            continue
        path = path.resolve()
        caption = " ".join(caption.split())
        if not caption:
            out.skip("empty_caption", f"{where}: {shown}: {REASONS['empty_caption']}")
            continue
        if (path, caption) in seen:
            out.skip("duplicate", f"{where}: {shown}: {REASONS['duplicate']}")
            continue
        seen.add((path, caption))
        if path not in index:
            index[path] = len(out.images)
            out.images.append(path)
        out.texts.append(caption)
        text_image.append(index[path])
    out.text_image = np.array(text_image, np.int64)
    if not out.texts:
        detail = "; ".join(out.messages[:3])
        raise DatasetError(f"{source}: no usable image and caption" + (f" ({out.summary()}: {detail})" if detail else ""))
    return out


def _whole_document(text: str) -> dict | None:
    """The Karpathy document that `text` is, or None (JSON lines)."""
    if not text.lstrip().startswith("{"):
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None  # several lines, each an object
    return doc if isinstance(doc, dict) and isinstance(doc.get("images"), list) else None


def _json_lines(text: str, source: Path, split: str | None, out: CaptionedSet):
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source.name} line {n}"
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            out.skip("not_json", f"{where}: {REASONS['not_json']}")
            continue
        image, caption = obj.get("image"), obj.get("caption")
        if not isinstance(image, str) or not image or not isinstance(caption, str):
            out.skip("no_image_or_caption", f"{where}: {REASONS['no_image_or_caption']}")
            continue
        if split is not None and obj.get("split") != split:
            continue
        yield where, (image,), caption


def _karpathy(entries: list, source: Path, split: str | None, default_split: str, out: CaptionedSet):
    splits = {e.get("split") for e in entries if isinstance(e, dict)}
    if split is None and default_split in splits:
        split = default_split
    for n, e in enumerate(entries):
        where = f"{source.name} image {n}"
        if not isinstance(e, dict) or not isinstance(e.get("filename"), str) or not isinstance(e.get("sentences"), list):
            out.skip("no_image_or_caption", f"{where}: needs \"filename\" and \"sentences\"")
            continue
        if split is not None and e.get("split") != split:
            continue
        name = e["filename"]
        candidates = (f"{e['filepath']}/{name}", name) if isinstance(e.get("filepath"), str) else (name,)
        for s in e["sentences"]:
            caption = s.get("raw") if isinstance(s, dict) else s
            if not isinstance(caption, str):
                out.skip("no_image_or_caption", f"{where}: a sentence with no \"raw\" text")
                continue
            yield where, candidates, caption
