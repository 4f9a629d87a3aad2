"""The one exception tree of FusionRank.

Every error the project raises on purpose derives from :class:`FusionRankError`, so callers
can catch the whole family with one clause and the service can map families to HTTP codes::

    FusionRankError
    ├── FeatureStoreError            per-item feature store (service.features)
    │   ├── FeatureStoreUnavailable  backend down or timed out (503)
    │   ├── FeatureStoreFault        the backend refused a command: permissions, type, memory
    │   ├── FeatureFormatError       stored data of a version is unreadable (500)
    │   ├── NoPublishedVersion       nothing has been published yet (503)
    │   └── FeatureVersionMissing    the version a model reads is not (or no longer) stored
    ├── CatalogueError               offline: malformed catalogue (names file and row)
    ├── ArtifactError                missing or invalid model artifacts
    │   ├── ExportParityError        offline: an exported graph disagrees with PyTorch
    │   └── ModelRejected            a reload refused a version (features it cannot read)
    ├── DeviceUnavailable            settings ask for CUDA but onnxruntime cannot use it
    ├── RequestRejected              a request naming something that does not exist (422)
    ├── ServiceNotReady              the service is loading, failed to load, or shutting down
    ├── Overloaded                   too many requests in flight: refused at once (503)
    └── DeadlineExceeded             a request ran past request_timeout_s (503)

What each class answers over HTTP is decided in one place, ``service.http_errors``: 503 with
Retry-After only for transient conditions (a dependency down or slow, overload, not ready), a
JSON 500 naming the reason for faults of the service or its data, 409 for a refused reload.
One undecodable item value is not an error at all: the item is reported missing.

Add new classes here, under the narrowest fitting parent, with a one-line docstring.
"""


class FusionRankError(Exception):
    """Base class of every error raised on purpose by FusionRank."""


class FeatureStoreError(FusionRankError):
    """Base class of feature store errors."""


class FeatureStoreUnavailable(FeatureStoreError):
    """The feature store backend is down or timed out; the service maps this to 503."""


class FeatureStoreFault(FeatureStoreError):
    """The backend answered a command with an error (no permission, wrong type, out of
    memory): a fault of its configuration or data that retrying does not mend."""


class FeatureFormatError(FeatureStoreError):
    """Stored data of a version (its meta, a value) is unreadable; the message names the key."""


class NoPublishedVersion(FeatureStoreError):
    """No feature version has been published yet."""


class FeatureVersionMissing(FeatureStoreError):
    """The feature version a model reads is not wholly in the store: not published yet, or
    retired (the replica serving that model is not ready; another may be)."""


class CatalogueError(FusionRankError):
    """Offline: the catalogue is malformed; the message names the file and row."""


class ArtifactError(FusionRankError):
    """Model artifacts are missing or invalid."""


class ExportParityError(ArtifactError):
    """An exported ONNX graph's outputs differ from PyTorch's beyond the stated tolerance."""


class ModelRejected(ArtifactError):
    """A reload refused a model version (e.g. its features are not the published ones)."""


class DeviceUnavailable(FusionRankError):
    """The settings ask for an execution device (CUDA) that onnxruntime cannot use here."""


class RequestRejected(FusionRankError):
    """A request that parsed but cannot be served as asked (e.g. like_id of an unknown item);
    ``loc`` names the field, as a 422's detail does."""

    def __init__(self, loc: list[str | int], message: str, status: int = 422) -> None:
        super().__init__(message)
        self.loc = loc
        self.status = status  # 413 for a part over its size limit


class ServiceNotReady(FusionRankError):
    """The service cannot score yet (loading, failed to load, or shutting down): 503."""


class Overloaded(FusionRankError):
    """Too many requests in flight: refused at once with 503 and Retry-After, never queued."""


class DeadlineExceeded(FusionRankError):
    """A request ran past request_timeout_s (a slow dependency): 503 and Retry-After."""
