"""Build a tiny random BLIP-2 retrieval model + processor + tokenizer, offline, into a directory.

Tests, benchmarks and CI load it back through the same `from_pretrained` path as a real
checkpoint. `searchengine make-tiny-model DIR` runs it from the command line. With
`--size real` it builds the real `blip2-itm-vit-g` architecture with random weights, which is
what the benchmarks time.
"""

from __future__ import annotations

from pathlib import Path

# Every word a test or a person is likely to type, plus single letters and "##" pieces so that
# any lower-case word tokenizes to something other than [UNK].
_WORDS = """
a an the of on in at by with and or to from for under over near inside outside is are
dog dogs cat cats bird birds horse cow sheep fish animal animals elephant elephants ladybird bug
beach sea ocean sand dune desert water rain drops wave waves river lake storm sky cloud clouds sun
tree trees wood forest garden meadow grass flower flowers yellow fresh green red blue white black
orange pink purple brown grey gray dark light bright colorful colourful abstract stripes pattern
car cars road street city building house people person man woman child children boy girl
photo picture image painting drawing wallpaper background close up macro
mountain snow winter summer spring autumn night day sunset sunrise field leaf leaves wing wings
two three one big small tall old new empty
""".split()


def _vocab() -> list[str]:
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789")
    pieces = ["##" + c for c in letters]
    seen: dict[str, None] = {}
    for w in special + letters + pieces + _WORDS + [".", ",", "-", "'", "!", "?"]:
        seen.setdefault(w, None)
    return list(seen)


def build_tiny_model(out_dir: str | Path, *, seed: int = 0, size: str = "tiny") -> Path:
    """Write a random `Blip2ForImageTextRetrieval` and its processor to `out_dir`."""
    import torch
    from transformers import (
        BertTokenizer,
        Blip2Config,
        Blip2ForImageTextRetrieval,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
    )
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    vocab = _vocab()
    if size == "tiny":
        vision = Blip2VisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8, initializer_range=0.02,
        )
        qformer = Blip2QFormerConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=len(vocab), encoder_hidden_size=32, use_qformer_text_input=True,
            max_position_embeddings=64,
        )
        num_query_tokens, embed_dim = 8, 16
    elif size == "real":
        # The blip2-itm-vit-g architecture: EVA ViT-g/14 at 224, BERT-base Q-Former, 32 queries.
        vision = Blip2VisionConfig(
            hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
            image_size=224, patch_size=14, qkv_bias=True, initializer_range=0.02,
        )
        qformer = Blip2QFormerConfig(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            vocab_size=30523, encoder_hidden_size=1408, use_qformer_text_input=True,
            max_position_embeddings=512, cross_attention_frequency=2,
        )
        num_query_tokens, embed_dim = 32, 256
        # A 30523-row vocab so token ids span the real embedding table.
        vocab = vocab + [f"tok{i}" for i in range(30523 - len(vocab))]
    else:
        raise ValueError(f"size must be 'tiny' or 'real', not {size!r}")

    config = Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        num_query_tokens=num_query_tokens,
        image_text_hidden_size=embed_dim,
    )
    config.architectures = ["Blip2ForImageTextRetrieval"]
    torch.manual_seed(seed)
    model = Blip2ForImageTextRetrieval(config).eval()
    # Random but not degenerate: the default init leaves the query tokens at zero, and with
    # BERT's 0.02 init every image scores within 1e-3 of every other, which would let a test
    # pass with the wrong image. A fan-in scaled init spreads ITC and ITM scores widely.
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 0.5)
        if size == "tiny":
            for name, p in model.named_parameters():
                if p.dim() >= 2 and name != "query_tokens":
                    p.normal_(0.0, 0.8 / p[0].numel() ** 0.5)

    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    image_processor = BlipImageProcessorPil(size={"height": vision.image_size, "width": vision.image_size})
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
