"""The one exception tree of FusionRank.

Every error the project raises on purpose derives from :class:`FusionRankError`, so callers
can catch the whole family with one clause and the service can map families to HTTP codes::

    FusionRankError
    ├── FeatureStoreError            per-item feature store (service.features)
    │   ├── FeatureStoreUnavailable  backend down or timed out (service answers 503)
    │   ├── FeatureFormatError       a stored value has a wrong header or length
    │   ├── NoPublishedVersion       nothing has been published yet
    │   └── FeatureVersionMismatch   the store serves features of another model export
    ├── CatalogueError               offline: malformed catalogue (names file and row)
    ├── ArtifactError                missing or invalid model artifacts
    │   ├── ExportParityError        offline: an exported graph disagrees with PyTorch
    │   └── ModelRejected            a reload refused a version (features it cannot read)
    ├── DeviceUnavailable            settings ask for CUDA but onnxruntime cannot use it
    ├── ServiceNotReady              the service is loading, failed to load, or shutting down
    ├── Overloaded                   too many requests in flight: refused at once (503)
    └── DeadlineExceeded             a request ran past request_timeout_s (503)

Add new classes here, under the narrowest fitting parent, with a one-line docstring.
"""


class FusionRankError(Exception):
    """Base class of every error raised on purpose by FusionRank."""


class FeatureStoreError(FusionRankError):
    """Base class of feature store errors."""


class FeatureStoreUnavailable(FeatureStoreError):
    """The feature store backend is down or timed out; the service maps this to 503."""


class FeatureFormatError(FeatureStoreError):
    """A stored feature value has a wrong header or length; the message names the id/key."""


class NoPublishedVersion(FeatureStoreError):
    """No feature version has been published yet."""


class FeatureVersionMismatch(FeatureStoreError):
    """The store's current features are not the ones the loaded model was exported with."""


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


class ServiceNotReady(FusionRankError):
    """The service cannot score yet (loading, failed to load, or shutting down): 503."""


class Overloaded(FusionRankError):
    """Too many requests in flight: refused at once with 503 and Retry-After, never queued."""


class DeadlineExceeded(FusionRankError):
    """A request ran past request_timeout_s (a slow dependency): 503 and Retry-After."""
