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


def build_tiny_model(
    out_dir: str | Path, *, seed: int = 0, size: str = "tiny", vision_layers: int | None = None, image_size: int | None = None
) -> Path:
    """Write a random `Blip2ForImageTextRetrieval` and its processor to `out_dir`.
    `vision_layers`: fewer ViT layers than the size has (for measuring what runs after the
    ViT, as fine-tuning on cached ViT outputs does). `image_size`: another input size than
    the size's own (a multiple of its patch size)."""
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
    if vision_layers is not None:
        vision.num_hidden_layers = vision_layers
    if image_size is not None:
        vision.image_size = image_size

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


def build_tiny_captioner(out_dir: str | Path, *, kind: str = "blip", seed: int = 0, size: str = "tiny") -> Path:
    """Write a random captioner and its processor to `out_dir`.

    kind "blip": `BlipForConditionalGeneration` (BertTokenizer, [DEC] as bos), the CPU default's
    family; with size "real", the blip-image-captioning-base architecture (ViT-B/16 at 384,
    BERT-base decoder). kind "blip2": `Blip2ForConditionalGeneration` with a tiny OPT and a
    word-level fast tokenizer, the GPU default's family (tiny only). The tiny vocabularies are
    whole words, so random captions are words a test can search for.
    """
    import torch
    from transformers import BertTokenizer
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    words = list(dict.fromkeys(_WORDS))
    torch.manual_seed(seed)
    if kind == "blip":
        from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor, BlipTextConfig, BlipVisionConfig

        if size == "real":
            vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
            vocab += [f"tok{i}" for i in range(30523 - len(vocab))] + ["[DEC]"]
            text = BlipTextConfig(vocab_size=len(vocab), bos_token_id=len(vocab) - 1, pad_token_id=0, sep_token_id=3)
            vision = BlipVisionConfig(image_size=384, patch_size=16)
        elif size == "tiny":
            vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words + ["[DEC]"]
            text = BlipTextConfig(
                vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                encoder_hidden_size=32, max_position_embeddings=64, bos_token_id=len(vocab) - 1, pad_token_id=0,
                sep_token_id=3, eos_token_id=3,
            )
            vision = BlipVisionConfig(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                patch_size=8, initializer_range=0.02,
            )
        else:
            raise ValueError(f"size must be 'tiny' or 'real', not {size!r}")
        config = BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict())
        config.architectures = ["BlipForConditionalGeneration"]
        model = BlipForConditionalGeneration(config).eval()
        tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True, bos_token="[DEC]")
        image_size = vision.image_size
        processor = BlipProcessor(
            image_processor=BlipImageProcessorPil(size={"height": image_size, "width": image_size}), tokenizer=tokenizer
        )
    elif kind == "blip2":
        if size != "tiny":
            raise ValueError("only a tiny BLIP-2 captioner can be built")
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import (
            Blip2Config,
            Blip2ForConditionalGeneration,
            Blip2Processor,
            Blip2QFormerConfig,
            Blip2VisionConfig,
            OPTConfig,
            PreTrainedTokenizerFast,
        )

        specials = ["<pad>", "</s>", "<unk>", "<image>"]
        vocab = {w: i for i, w in enumerate(specials + words)}
        backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
            additional_special_tokens=["<image>"],  # the processor makes it its image token
        )
        num_query_tokens = 4
        vision = Blip2VisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
            patch_size=8, initializer_range=0.02,
        )
        qformer = Blip2QFormerConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, encoder_hidden_size=32,
            vocab_size=len(vocab),
        )
        opt = OPTConfig(
            vocab_size=len(vocab), hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, word_embed_proj_dim=32, bos_token_id=1, eos_token_id=1, pad_token_id=0,
        )
        config = Blip2Config(
            vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=opt.to_dict(),
            num_query_tokens=num_query_tokens, image_token_index=vocab["<image>"],
        )
        config.architectures = ["Blip2ForConditionalGeneration"]
        model = Blip2ForConditionalGeneration(config).eval()
        processor = Blip2Processor(
            image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tokenizer,
            num_query_tokens=num_query_tokens,
        )
    else:
        raise ValueError(f"kind must be 'blip' or 'blip2', not {kind!r}")
    if size == "tiny":  # outputs that depend on the image, as in build_tiny_model
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 1.5 / p[0].numel() ** 0.5)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
