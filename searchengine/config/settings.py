"""All settings in one place: defaults, `SEARCHENGINE_*` environment variables, CLI flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from searchengine.config.datadir import default_data_dir
from searchengine.config.devices import defaults_for

DEFAULT_MODEL = "Salesforce/blip2-itm-vit-g"




class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SEARCHENGINE_", extra="ignore")

    data_dir: Path = Field(default_factory=default_data_dir)
    # None: the model the index was built with, or DEFAULT_MODEL for a new index.
    model: str | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # int8: the captioner and the question-answering model in 8 bits (bitsandbytes, CUDA only);
    # the retrieval model in the automatic dtype.
    dtype: Literal["auto", "float32", "bfloat16", "float16", "int8"] = "auto"

    # Indexing.
    # The store: None for the SQLite file in the data dir; else a SQLAlchemy URL of a database
    # server (postgresql+psycopg://user:password@host/db), which several machines can share.
    # FAISS, thumbnails and caches stay in each machine's data dir, derived from the store.
    database_url: str | None = None
    batch_size: int = Field(0, ge=0)  # 0: automatic (8 on a CPU, 64 on a GPU)
    decode_workers: int = Field(0, ge=0)  # 0: one per core
    torch_threads: int = Field(0, ge=0)  # torch's intra-op threads; 0: as devices.py decides
    # How photos are decoded for indexing: "fast" decodes a JPEG at the smallest DCT scale
    # that still holds the pixels the model, captioner and thumbnail need a side (5x faster
    # on 12 MP photos; ITC cosine >= 0.999999 against "exact", benchmarks/feed_rate.py);
    # "exact" decodes in full, as the reference processor is given it.
    # "device": a plain JPEG is decoded on the model's device (nvJPEG on a CUDA GPU, through
    # torchvision) and resized there; other files as "fast" (searchengine/media/device_decode.py).
    decode: Literal["fast", "exact", "device"] = "fast"
    max_image_pixels: int = Field(150_000_000, ge=1)
    # Where ITM re-ranking gets each candidate's ViT output. "auto": an fp16 cache written at
    # index time when indexing runs on a CPU (re-running the ViT there costs seconds per
    # candidate), none on a GPU (a few ms per candidate); query time reads the cache where it
    # has an entry and re-runs the ViT otherwise. See benchmarks/query_latency.py.
    # "cache-int8": the cache in 8 bits with a scale per token, half the disk of fp16.
    itm_features: Literal["auto", "cache", "cache-int8", "recompute"] = "auto"
    save_every_s: float = Field(60.0, gt=0)
    # Store backups (backups/ in the data dir), after an indexing run that changed something;
    # a watcher makes one at most every backup_interval_s. 0 backups: none are made.
    backups: int = Field(3, ge=0)
    backup_interval_s: float = Field(3600.0, ge=0)
    # Which symlinks lead into the library (see searchengine/media/links.py): "folders" follows
    # linked folders anywhere and file links that stay inside; "none" nothing outside the
    # indexed folders; "all" everything. None: as the index was built ("folders" for a new one).
    links: Literal["none", "folders", "all"] | None = None
    # Captions, made at index time. None: as the index was built (on for a new index).
    # caption_model None: the index's captioner, or the CPU or GPU default for a new index.
    captions: bool | None = None
    caption_model: str | None = None
    caption_max_tokens: int = Field(30, ge=1, le=512)  # new tokens per caption
    caption_beams: int = Field(1, ge=1, le=16)  # 1: greedy, as the model cards' examples
    # The model that answers questions about a photo (searchengine/models/vqa.py): None: the index's
    # captioner when it is BLIP-2 with a language model, else none (asking says so).
    vqa_model: str | None = None

    # Search.
    k_candidates: int = Field(128, ge=1)  # ITC candidates taken from FAISS, as in the paper
    rerank_top: int = Field(20, ge=0)  # how many of them ITM re-scores; 0 turns it off
    # ITM is a match classifier: a re-ranked hit with P(match) at or above this counts as a
    # "strong match" in a result's header (the classifier's own decision boundary). `min_itm`
    # (off by default) keeps only those above a threshold of the user's choosing.
    strong_match: float = Field(0.5, ge=0, le=1)
    text_max_tokens: int = Field(35, ge=2)  # the paper truncates text at 35 tokens
    # How queries are encoded on a CPU: "torch" (PyTorch eager, in the model's dtype) or "onnx"
    # (ONNX Runtime on a float32 export, 3.4x faster than torch fp32 on 2 cores, ITC cosine
    # 0.9999999; needs onnxruntime and onnx; see onnx_text.py). "auto": in `serve` on a CPU with
    # ONNX Runtime installed (the [cpu] extra brings it), whichever encoded a query faster at
    # start-up with the same vectors (torch bf16 on an avx512_bf16 CPU is close to ONNX);
    # torch for one-off commands, where loading a second copy of the text encoder costs more
    # than it saves on one query, and on GPUs.
    text_backend: Literal["auto", "torch", "onnx"] = "auto"
    max_query_chars: int = Field(1000, ge=1)
    search_mode: Literal["hybrid", "semantic", "keyword"] = "hybrid"
    # The vector index's tier (searchengine/vectors/ann.py). "auto": an exact scan below
    # `ann_threshold` images, an approximate index (FAISS IVF, `ann_factory`) above it whose
    # candidates are re-scored exactly, so every score shown is the exact one. "exact" and
    # "ann" force a tier at any size. benchmarks/ann.py measured the defaults.
    vector_tier: Literal["auto", "exact", "ann"] = "auto"
    ann_threshold: int = Field(20_000, ge=1)  # the exact scan: ~160 ms a query there on 2 cores
    # IVF with 8-bit scalar codes: 4 representatives x (256 + 8 id) bytes = ~1.1 KiB an image
    # for BLIP-2. PQ codes are smaller but trained 15x slower here (benchmarks/ann.py).
    ann_factory: str = "IVF{nlist},SQ8"  # {nlist}: chosen from the library's size
    ann_reps: int = Field(4, ge=1)  # vectors per image in the approximate index (k-means of the Q)
    # Images proposed per image asked for, then re-scored. 0: chosen at build time, the
    # fewest (1, 2, 4) that reach ann_target_recall with nprobe tuned (benchmarks/ann.py).
    ann_overfetch: int = Field(0, ge=0)
    ann_target_recall: float = Field(0.97, gt=0, le=1)  # recall@10 the build tunes nprobe for
    # ... and recall@100, for later pages: at 1M images recall@10 0.97 alone left it at 0.75.
    ann_target_recall_deep: float = Field(0.9, gt=0, le=1)
    ann_nprobe: int = Field(0, ge=0)  # 0: tuned at build time for ann_target_recall
    exact_scan_max: int = Field(4096, ge=0)  # a filter leaving this few images scans them exactly
    # Where FAISS searches: "auto" on a GPU where FAISS has GPU support (faiss-gpu) and a CUDA
    # device is present, else the CPU (one log line says so); "cpu"; "gpu" (a warning if none).
    vector_device: Literal["auto", "cpu", "gpu"] = "auto"
    rrf_k: int = Field(60, ge=1)  # reciprocal rank fusion's constant (Cormack et al. use 60)

    # Service (`searchengine serve`).
    host: str = "127.0.0.1"  # loopback unless asked: the index shows every photo's path
    port: int = Field(8000, ge=0, le=65535)
    api_key: SecretStr | None = None  # when set, every endpoint wants it
    cors_origins: list[str] = []  # CORS is off unless origins are named
    max_upload_bytes: int = Field(25 * 1024 * 1024, ge=1)
    # Every other request body (a question to /ask, any JSON): refused past this, unread.
    max_body_bytes: int = Field(1024 * 1024, ge=1)
    max_upload_pixels: int = Field(50_000_000, ge=1)
    text_batch_max: int = Field(16, ge=1)  # micro-batcher: queries per text-encoder call
    text_batch_wait_ms: float = Field(0.0, ge=0)  # extra wait for company; 0: continuous batching
    ranking_cache_size: int = Field(256, ge=0)  # rankings kept for paging
    upload_decodes: int = Field(1, ge=1)  # uploads decoded at once (a 49 MP PNG: ~330 MiB each)
    upload_queue: int = Field(8, ge=0)  # uploads waiting for a turn; past it, 503 + Retry-After
    file_workers: int = Field(4, ge=1)  # threads for reading image files (their own pool)
    file_read_timeout_s: float = Field(15.0, gt=0)  # past this, a file read answers 504
    thumbnail_size: int = Field(320, ge=16, le=2048)
    # The detail view's image: screen-sized, so paging through results never loads a 16 MB
    # original; made on first request and kept.
    preview_size: int = Field(1600, ge=64, le=8192)
    refresh_interval_s: float = Field(1.0, ge=0)  # how often the service looks for index writes

    @field_validator("api_key", mode="before")
    @classmethod
    def _blank_key_is_no_key(cls, value):
        """An empty or blank key is no key (compose passes `SEARCHENGINE_API_KEY: ''` when
        it is unset): the server then says it has none, rather than guarding with ''."""
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        return None if isinstance(raw, str) and not raw.strip() else value

    def writes_feature_cache(self, device: str) -> bool:
        """Whether ViT features are cached (at index time, and when re-computed at query time)."""
        return self.itm_features in ("cache", "cache-int8") or (self.itm_features == "auto" and defaults_for(device).vit_cache)

    def captions_on(self, recorded: bool | None) -> bool:
        """Whether a run captions: the `captions` setting, else on where a caption model is
        named (naming a captioner asks for captions), else as the index was captioned
        (`recorded`: None for a new index), else on."""
        if self.captions is not None:
            return self.captions
        if self.caption_model:
            return True
        return recorded if recorded is not None else True

    @property
    def decode_threads(self) -> int:
        """Decoding threads: `decode_workers`, or one per core."""
        return self.decode_workers or os.cpu_count() or 1

    @property
    def thumbnails_dir(self) -> Path:
        return self.data_dir / "thumbnails"

    @property
    def previews_dir(self) -> Path:
        return self.data_dir / "previews"

    @property
    def backups_dir(self) -> Path:
        return self.data_dir / "backups"

    @property
    def store_path(self) -> Path:
        """The SQLite store (where no `database_url` names a database server)."""
        return self.data_dir / "store.db"

    @property
    def store_location(self) -> str:
        """The store as messages name it: the SQLite file, or the database's URL without its
        password."""
        if not self.database_url:
            return str(self.store_path)
        from sqlalchemy.engine import make_url

        return make_url(self.database_url).render_as_string(hide_password=True)

    @property
    def vectors_path(self) -> Path:
        return self.data_dir / "vectors.faiss"

    @property
    def ann_manifest_path(self) -> Path:
        """Names the approximate index's file and its parameters; its atomic write is the
        moment a rebuilt index takes over (see searchengine/vectors/ann.py)."""
        return self.data_dir / "ann.json"

    @property
    def features_dir(self) -> Path:
        return self.data_dir / "features"


def settings_from_args(args) -> "Settings":
    """The settings a command runs with: its flags (an argparse namespace; a flag not given is
    None) over SEARCHENGINE_* over the defaults. Every command's, the CLI's and tuning's."""
    keys = ("data_dir", "model", "device", "dtype", "itm_features", "batch_size", "decode_workers",
            "max_image_pixels", "k_candidates", "rerank_top", "host", "port", "captions", "caption_model", "search_mode", "links", "vqa_model", "text_backend", "database_url")
    values = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if values.get("caption_model") and "captions" not in values:
        # A captioner named on the command line outweighs SEARCHENGINE_CAPTIONS (flags over
        # the environment); what naming one means is `Settings.captions_on`'s to say.
        values["captions"] = None
    return Settings(**values)
