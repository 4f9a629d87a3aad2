"""The service's one settings class: every value comes from a ``FUSIONRANK_*`` environment
variable (or the defaults below) and is validated at start-up, before anything is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.schemas import RequestLimits

MIN_TOKEN_CHARS = 32
MIN_TOKEN_DISTINCT_CHARS = 10


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FUSIONRANK_",
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        hide_input_in_errors=True,  # errors never echo a secret (admin_token, redis_url)
    )

    # -- artifacts and feature store -------------------------------------------------------
    artifacts_dir: Path = Path("artifacts")
    """Holds models/<version>/ and models/CURRENT, and features/ (the embedded store)."""
    model_version: str | None = None
    """The model version to serve; unset: the one named in models/CURRENT."""
    redis_url: str | None = None
    """The Redis feature store; unset: the embedded store in artifacts_dir/features. A
    ``redis+cluster://host:port[,host:port...]`` URL names seed nodes of a Redis Cluster."""
    redis_prefix: str = Field("fusionrank", min_length=1)
    feature_timeout_s: float = Field(1.0, gt=0, le=60)
    """Socket timeout of one feature store round trip."""
    follow_published: bool = False
    """Follow the store's published pointer: when it names the features of another model than
    the one served, load and warm the version models/CURRENT names (once its features are the
    published ones), then swap to it. A fleet of replicas then upgrades one at a time after
    ``python -m export`` publishes; without it, use POST /admin/reload."""
    follow_interval_s: float = Field(5.0, gt=0, le=3600)
    """How often the pointer is polled when following it (each wait jittered by +-50 %)."""

    # -- HTTP server -----------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(1, ge=1, le=64)
    access_log: bool = False
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    # -- inference -------------------------------------------------------------------------
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when onnxruntime-gpu sees a GPU, else CPU; cuda: fail unless CUDA works."""
    intra_op_threads: int = Field(1, ge=1, le=256)
    """onnxruntime (and FAISS) threads per operator, per worker process."""
    feature_store_threads: int = Field(4, ge=1, le=256)
    """Threads per worker for feature store round trips, apart from every other blocking work:
    a hung store can hold these (each for at most feature_timeout_s), never the encoder's."""
    compute_threads: int = Field(2, ge=1, le=256)
    """Threads per worker for CPU work off the event loop: query encoding and FAISS search."""
    batch_max_size: int = Field(2048, ge=1, le=65536)
    """Most candidate rows scored in one onnxruntime run (the largest shape bucket)."""
    batch_max_wait_us: int = Field(500, ge=0, le=1_000_000)
    """Longest a request's candidates wait for others to share their run. Event loop timers
    are millisecond-grained (uvloop rounds), so values under 1 ms mean "next loop turn"."""
    batch_min_bucket: int = Field(16, ge=1, le=65536)
    """Smallest padded batch shape; shapes are powers of two up to batch_max_size."""
    query_cache_size: int = Field(4096, ge=0, le=10_000_000)
    """Recent queries whose embeddings are kept; 0 turns the cache off."""
    query_encoder_int8: bool = True
    """On CPU, encode queries with the export's int8 query encoder (when it has one): ~3x
    cheaper per query cache miss; what it costs in ranking quality is in the README."""
    feature_cache_items: int = Field(100_000, ge=0, le=100_000_000)
    """Item feature rows kept in-process per worker (~360 bytes each), oldest overwritten
    first; filled with the indexed items at start-up (as many as fit), then from traffic; 0:
    every fetch goes to the feature store. Only rows of the served model's feature version are
    kept, and versions are immutable, so a cached row is never stale."""

    # -- request limits --------------------------------------------------------------------
    max_query_chars: int = Field(256, ge=1, le=100_000)
    max_candidates: int = Field(2000, ge=1, le=65536)
    max_top_k: int = Field(1000, ge=1, le=65536)
    max_retrieve_k: int = Field(2000, ge=1, le=65536)
    default_top_k: int = Field(10, ge=1)
    default_retrieve_k: int = Field(200, ge=1)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    """Larger request bodies are refused with 413 before they are read whole."""
    max_image_bytes: int = Field(512 * 1024, ge=1024, le=64 << 20)
    """Largest photo of a search by photo (decoded); a larger one is a 413 before decoding."""

    # -- faults and overload -------------------------------------------------------------
    request_timeout_s: float = Field(1.0, gt=0, le=60)
    """Longest a /rank request may take; past it the answer is 503 with the reason (a slow
    feature store, say) instead of a client left waiting."""
    max_in_flight: int = Field(16, ge=1, le=100_000)
    """Requests served at once per worker (probes, /metrics and /admin excepted); more are
    refused at once with 503 and Retry-After, never queued. Size it as sustainable req/s x
    latency target (e.g. 50 req/s x 0.3 s = 16 on two cores)."""
    retry_after_s: int = Field(1, ge=0, le=3600)
    """The Retry-After header of every 503 (overload, dependency down, not ready)."""
    shutdown_timeout_s: float = Field(30.0, gt=0, le=3600)
    """On SIGTERM, how long in-flight requests may take to finish before the process exits."""
    admin_token: SecretStr | None = None
    """Bearer token of the /admin routes (POST /admin/reload); unset: no admin routes. At
    least 32 characters of at least 10 distinct ones, e.g. `python -c "import secrets;
    print(secrets.token_urlsafe(32))"`: the service refuses to start with a weaker one."""

    @field_validator("admin_token", mode="before")
    @classmethod
    def _empty_token_is_unset(cls, value: object) -> object:
        return None if value == "" else value  # compose passes an unset variable as ""

    @field_validator("admin_token")
    @classmethod
    def _strong_token(cls, token: SecretStr | None) -> SecretStr | None:
        if token is None:
            return None
        text = token.get_secret_value()
        if len(text) < MIN_TOKEN_CHARS or len(set(text)) < MIN_TOKEN_DISTINCT_CHARS:
            # The message never echoes the token.
            raise ValueError(
                f"admin_token is weak: use at least {MIN_TOKEN_CHARS} characters of at least "
                f"{MIN_TOKEN_DISTINCT_CHARS} distinct ones (secrets.token_urlsafe(32))"
            )
        if any(ch.isspace() or not ch.isprintable() for ch in text):
            raise ValueError("admin_token must be printable, without spaces")
        return token

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.admin_token is not None and self.workers > 1:
            # Each worker holds its own model: a reload reaches only the worker that answers.
            raise ValueError(
                "admin_token needs workers = 1 (a reload reaches one worker only): scale "
                "with replicas, or leave admin_token unset"
            )
        if self.default_top_k > self.max_top_k:
            raise ValueError(f"default_top_k {self.default_top_k} > max_top_k {self.max_top_k}")
        if self.default_retrieve_k > self.max_retrieve_k:
            raise ValueError(
                f"default_retrieve_k {self.default_retrieve_k} > max_retrieve_k "
                f"{self.max_retrieve_k}"
            )
        largest = max(self.max_candidates, self.max_retrieve_k)
        if self.batch_max_size < largest:
            # One request's candidates always fit one run, so the batcher never splits a request.
            raise ValueError(
                f"batch_max_size {self.batch_max_size} must be >= the most candidates of one "
                f"request ({largest}: max_candidates, max_retrieve_k)"
            )
        if self.batch_min_bucket > self.batch_max_size:
            raise ValueError(
                f"batch_min_bucket {self.batch_min_bucket} > batch_max_size {self.batch_max_size}"
            )
        return self

    @property
    def request_limits(self) -> RequestLimits:
        return RequestLimits(
            max_query_chars=self.max_query_chars,
            max_candidates=self.max_candidates,
            max_top_k=self.max_top_k,
            max_retrieve_k=self.max_retrieve_k,
            default_top_k=self.default_top_k,
            default_retrieve_k=self.default_retrieve_k,
        )

    @property
    def models_dir(self) -> Path:
        return self.artifacts_dir / "models"

    @property
    def embedded_features_dir(self) -> Path:
        return self.artifacts_dir / "features"
