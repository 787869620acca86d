"""Latency of a question about a photo (searchengine.models.vqa.Answerer) with the real BLIP-2
OPT-2.7b architecture (EVA ViT-g/14, a 32-query Q-Former, OPT-2.7b: 3.8 billion parameters,
random weights, built in memory: no download, nothing written), on this machine's device.

Random weights never say "end of answer", so every answer runs its whole token budget (30
new tokens, the product's default): the worst case; a trained model's short answers
("a dog", "yes") take a few tokens. Printed: model size, load (build) time, and per question
the time to prepare the inputs and to generate, with the ViT + Q-Former + prompt step timed
alone (`--tokens 1`) so the cost per further token shows.

    python benchmarks/vqa.py --questions 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import photos  # noqa: E402

QUESTIONS = ["What is in the picture?", "Is it raining?", "What colour is the sky?", "How many people are there?"]


def build(device: str, dtype):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig,
        PreTrainedTokenizerFast,
    )
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    specials = ["<pad>", "</s>", "<unk>", "<image>"]
    words = [w.strip("?").lower() for q in QUESTIONS for w in q.split()] + ["question", "answer", ":"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + words + [f"w{i}" for i in range(50272)]))}
    vocab = {w: i for w, i in vocab.items() if i < 50272}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<image>"],
    )
    # blip2-opt-2.7b's configuration.
    vision = Blip2VisionConfig(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                               image_size=224, patch_size=14, qkv_bias=True)
    qformer = Blip2QFormerConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                 encoder_hidden_size=1408, cross_attention_frequency=2, vocab_size=30522)
    opt = OPTConfig(vocab_size=50272, hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32,
                    max_position_embeddings=2048, word_embed_proj_dim=2560, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=opt.to_dict(),
                         num_query_tokens=32, image_token_index=vocab["<image>"])
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config).to(device=device, dtype=dtype).eval()
    processor = Blip2Processor(image_processor=BlipImageProcessorPil(size={"height": 224, "width": 224}),
                               tokenizer=tokenizer, num_query_tokens=32)
    return model, processor


def built(device_name: str):
    """(device, dtype, model, processor): the architecture built on the device the name
    resolves to, in the dtype `auto` picks there, with the product's thread settings."""
    from searchengine.app.wiring import use_threads
    from searchengine.config.settings import Settings
    from searchengine.models.loading import resolve_device, resolve_dtype

    device = resolve_device(device_name)
    dtype = resolve_dtype("auto", device)
    use_threads(Settings(), device)
    t = time.perf_counter()
    model, processor = build(device, dtype)
    params = sum(p.numel() for p in model.parameters()) / 1e9
    print(f"BLIP-2 OPT-2.7b architecture, {params:.2f} B parameters, {dtype} on {device}: built in {time.perf_counter() - t:.0f} s",
          flush=True)
    return device, dtype, model, processor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    import torch
    from PIL import Image

    from searchengine.models.vqa import Answerer

    device, _, model, processor = built(args.device)
    images = [Image.open(p).convert("RGB") for p in photos(args.questions)]
    full = Answerer("blip2-opt-2.7b (random)", model, processor, device=device)
    first = Answerer("blip2-opt-2.7b (random)", model, processor, device=device, max_new_tokens=1)
    full.ask(images[0], QUESTIONS[0])  # warm-up
    rows = []
    for i in range(args.questions):
        q = QUESTIONS[i % len(QUESTIONS)]
        one = first.ask(images[i], q).timings_ms
        t0 = time.perf_counter()
        a = full.ask(images[i], q)
        total = (time.perf_counter() - t0) * 1000
        tokens = len(processor.tokenizer(a.answer, add_special_tokens=False)["input_ids"])
        rows.append((q, one["prepare"] + one["generate"], total, tokens))
        print(f"  {q:30s} first token {rows[-1][1]:7.0f} ms; whole answer ({tokens} tokens) {total:7.0f} ms", flush=True)
    per_token = statistics.median((total - one) / max(tokens - 1, 1) for _, one, total, tokens in rows)
    print(f"median: first token {statistics.median(r[1] for r in rows):.0f} ms, whole 30-token answer "
          f"{statistics.median(r[2] for r in rows):.0f} ms, {per_token:.0f} ms per further token "
          f"(a 3-token answer: ~{statistics.median(r[1] for r in rows) + 2 * per_token:.0f} ms)")
    del torch


if __name__ == "__main__":
    main()
