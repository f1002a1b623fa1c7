"""The Federator API: one source of truth for the CRDs, the operator, the runtime and `federator validate`.

Every model forbids unknown fields, so a typo in a manifest is an error that names the field instead of
a setting that is silently ignored. Field names are the manifest's camelCase names.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from federator.api.cel import cel
from federator.api.names import MAX_NAME_LENGTH
from federator.api.tolerance import tolerance_problem

GROUP = "federator.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

BUILTIN_MODELS = ("mlp", "cnn", "lenet5")
CUSTOM_MODEL_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$"
MODEL_NAME_PATTERN = r"^(mlp|cnn|lenet5|[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*)$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$"


class Strict(BaseModel):
    """Base for every spec model: unknown fields are errors, names are used as given."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)


# --------------------------------------------------------------------------------------------- model


class ModelSpec(Strict):
    """Which network to train."""

    name: Annotated[
        str,
        Field(
            pattern=MODEL_NAME_PATTERN,
            description="Built-in model (mlp, cnn, lenet5) or `module:factory` importable in the runtime image.",
        ),
    ] = "mlp"
    hiddenSizes: Annotated[
        list[Annotated[int, Field(ge=1, le=65536)]],
        Field(max_length=16, description="mlp: widths of the hidden layers."),
    ] = [64]
    channels: Annotated[
        list[Annotated[int, Field(ge=1, le=4096)]],
        Field(max_length=8, description="cnn: output channels of each convolution block."),
    ] = [16, 32]
    dropout: Annotated[float, Field(ge=0.0, lt=1.0, description="Dropout before the last layer.")] = 0.0
    args: Annotated[
        dict[str, Any],
        Field(description="Keyword arguments passed to a custom `module:factory` model."),
    ] = {}


# ---------------------------------------------------------------------------------------------- data


class PartitionSpec(Strict):
    """How the training data is split among simulated clients."""

    scheme: Annotated[
        Literal["iid", "dirichlet", "shards"],
        Field(description="iid: uniform split; dirichlet: label skew with `alpha`; shards: sorted shards."),
    ] = "iid"
    alpha: Annotated[
        float, Field(gt=0.0, le=1000.0, description="Dirichlet concentration; smaller is more skewed.")
    ] = 0.5
    shardsPerClient: Annotated[int, Field(ge=1, le=100, description="shards: shards given to each client.")] = 2


class SyntheticSpec(Strict):
    """Shape of the generated `synthetic` classification data set."""

    samples: Annotated[int, Field(ge=10, le=10_000_000)] = 2000
    features: Annotated[int, Field(ge=1, le=100_000)] = 20
    classes: Annotated[int, Field(ge=2, le=1000)] = 4


class DataSpec(Strict):
    """Training and evaluation data."""

    dataset: Annotated[
        Literal["digits", "synthetic", "npz", "csv", "imagefolder"],
        Field(description="digits and synthetic are built in; npz, csv and imagefolder read `path`."),
    ] = "digits"
    path: Annotated[
        str | None, Field(min_length=1, description="File or folder for npz, csv and imagefolder data sets.")
    ] = None
    labelColumn: Annotated[str, Field(min_length=1, description="csv: the label column's header.")] = "label"
    imageSize: Annotated[int, Field(ge=4, le=1024, description="imagefolder: images are resized to this.")] = 28
    grayscale: Annotated[bool, Field(description="imagefolder: convert images to one channel.")] = True
    synthetic: SyntheticSpec = SyntheticSpec()
    partition: PartitionSpec = PartitionSpec()
    testFraction: Annotated[
        float, Field(gt=0.0, lt=1.0, description="Share of the data held out for central evaluation.")
    ] = 0.2
    seed: Annotated[int, Field(ge=0, le=2**31 - 1, description="Seed for splits, sampling and init.")] = 0
    normalize: Annotated[
        Literal["standard", "minmax", "none"] | None,
        Field(
            description="Per-feature scaling from the clients' pooled statistics, fixed before round 1: "
            "standard (zero mean, unit variance), minmax (0..1) or none. Default: standard for npz and csv, "
            "none for the built-in and imagefolder data sets."
        ),
    ] = None

    @model_validator(mode="after")
    @cel("!(self.dataset in ['npz', 'csv', 'imagefolder']) || has(self.path)",
         "path is required when dataset is npz, csv or imagefolder", field_path=".path")
    def _path_for_file_datasets(self) -> DataSpec:
        if self.dataset in ("npz", "csv", "imagefolder") and not self.path:
            raise ValueError(f"path is required when dataset is {self.dataset!r}: set data.path to the file")
        return self


# ------------------------------------------------------------------------------------------ training


class TrainingSpec(Strict):
    """Local training on each client."""

    localEpochs: Annotated[int, Field(ge=1, le=1000)] = 1
    batchSize: Annotated[int, Field(ge=1, le=65536)] = 32
    optimizer: Literal["sgd", "adam"] = "sgd"
    learningRate: Annotated[float, Field(gt=0.0, le=10.0)] = 0.05
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    weightDecay: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    proximalMu: Annotated[
        float, Field(ge=0.0, le=100.0, description="FedProx: weight of the proximal term (0 = FedAvg).")
    ] = 0.0


# ------------------------------------------------------------------------------------------- clients


class ResourceList(Strict):
    cpu: Annotated[str | None, Field(pattern=QUANTITY_PATTERN)] = None
    memory: Annotated[str | None, Field(pattern=QUANTITY_PATTERN)] = None


class Resources(Strict):
    requests: ResourceList = ResourceList()
    limits: ResourceList = ResourceList()


class PodTemplate(Strict):
    """The container that runs a server or client pod."""

    image: Annotated[str, Field(min_length=1)] = "ghcr.io/federator/runtime:0.1.0"
    imagePullPolicy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    resources: Resources = Resources()
    env: Annotated[dict[str, str], Field(description="Extra environment variables.")] = {}


class AutoscalingSpec(Strict):
    """HPA for the client worker pool, on the server's pending-task count."""

    enabled: bool = False
    minReplicas: Annotated[int, Field(ge=1, le=10000)] = 1
    maxReplicas: Annotated[int, Field(ge=1, le=10000)] = 10
    metric: Annotated[str, Field(min_length=1)] = "federator_pending_tasks"
    targetAverageValue: Annotated[
        float, Field(gt=0.0, description="Pending tasks per worker pod the HPA aims for.")
    ] = 2.0

    @model_validator(mode="after")
    @cel("self.minReplicas <= self.maxReplicas", "minReplicas must be <= maxReplicas", field_path=".minReplicas")
    def _min_le_max(self) -> AutoscalingSpec:
        if self.minReplicas > self.maxReplicas:
            raise ValueError(
                f"minReplicas ({self.minReplicas}) must be <= maxReplicas ({self.maxReplicas})"
            )
        return self


class ClientsSpec(Strict):
    """Simulated clients (data partitions) and the worker pool that trains them."""

    count: Annotated[
        int, Field(ge=1, le=100_000, description="Number of simulated clients (data partitions).")
    ] = 10
    perRound: Annotated[
        int | None, Field(ge=1, le=100_000, description="Clients sampled each round (default: count).")
    ] = None
    minPerRound: Annotated[
        int | None,
        Field(ge=1, le=100_000, description="Updates needed to close a round at its timeout (default: perRound)."),
    ] = None
    roundTimeoutSeconds: Annotated[float, Field(gt=0.0, le=86400.0)] = 120.0
    maxRoundRetries: Annotated[
        int, Field(ge=0, le=100, description="Retries of a round that got fewer than minPerRound updates.")
    ] = 3
    workers: Annotated[
        int, Field(ge=1, le=10000, description="Worker processes (pods) that train the simulated clients.")
    ] = 2
    template: PodTemplate = PodTemplate()
    autoscaling: AutoscalingSpec = AutoscalingSpec()

    @property
    def per_round(self) -> int:
        return self.perRound if self.perRound is not None else self.count

    @property
    def min_per_round(self) -> int:
        return self.minPerRound if self.minPerRound is not None else self.per_round

    @model_validator(mode="after")
    @cel("!has(self.perRound) || self.perRound <= self.count", "perRound must be <= count", field_path=".perRound")
    @cel("!has(self.minPerRound) || self.minPerRound <= (has(self.perRound) ? self.perRound : self.count)",
         "minPerRound must be <= perRound (perRound defaults to count)", field_path=".minPerRound")
    def _round_sizes(self) -> ClientsSpec:
        if self.per_round > self.count:
            raise ValueError(f"perRound ({self.per_round}) must be <= count ({self.count})")
        if self.min_per_round > self.per_round:
            raise ValueError(f"minPerRound ({self.min_per_round}) must be <= perRound ({self.per_round})")
        return self


# --------------------------------------------------------------------------------------- aggregation


class ServerOptimizerSpec(Strict):
    """Optimizer applied by the server to the aggregated update (FedOpt)."""

    name: Annotated[
        Literal["sgd", "adam", "yogi", "adagrad"],
        Field(description="sgd with learningRate 1 is plain FedAvg; adam is FedAdam, yogi is FedYogi."),
    ] = "sgd"
    learningRate: Annotated[float, Field(gt=0.0, le=100.0)] = 1.0
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    beta1: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    beta2: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.99
    tau: Annotated[float, Field(gt=0.0, le=1.0, description="Adaptivity (epsilon) of adam, yogi, adagrad.")] = 1e-3


RuleName = Literal["fedavg", "median", "trimmed_mean", "krum", "multi_krum", "geometric_median",
                   "centered_clipping"]


class NormClipSpec(Strict):
    """Pre-step: scale each update (its difference to the global model) down to at most `maxNorm`."""

    maxNorm: Annotated[float, Field(gt=0.0, le=1e9, description="Largest L2 norm an update keeps.")]


class BucketingSpec(Strict):
    """Pre-step (Karimireddy et al. 2022): average random buckets of `size` updates before the rule."""

    size: Annotated[int, Field(ge=1, le=1000, description="Updates per bucket (s); 1 leaves them as they are.")]


class NNMSpec(Strict):
    """Pre-step (Allouah et al. 2023, "Fixing by Mixing"): each update becomes the mean of its n - f nearest
    updates, itself included, before the rule. The published remedy for robust rules on heterogeneous data."""

    f: Annotated[
        int | None,
        Field(ge=0, le=100_000, description="Byzantine updates assumed per round: each update mixes its n - f "
                                            "nearest (default: byzantine.expectedFraction of the round, rounded "
                                            "up)."),
    ] = None


class AggregationSpec(Strict):
    """How client updates become the next global model."""

    rule: Annotated[
        RuleName,
        Field(description="Aggregation rule. fedavg weights updates by sample count and streams (O(model) memory); "
                          "the others are robust to Byzantine clients and buffer every update of a round."),
    ] = "fedavg"
    trimFraction: Annotated[
        float, Field(ge=0.0, lt=0.5, description="trimmed_mean: share cut from each end per coordinate.")
    ] = 0.2
    f: Annotated[
        int | None,
        Field(ge=0, le=100_000, description="krum, multi_krum: Byzantine updates assumed per round "
                                            "(default: byzantine.expectedFraction of the round, rounded up)."),
    ] = None
    m: Annotated[
        int | None, Field(ge=1, le=100_000, description="multi_krum: best-scored updates averaged (default n - f).")
    ] = None
    tolerance: Annotated[
        float, Field(gt=0.0, le=1.0, description="geometric_median: Weiszfeld stops below this relative change.")
    ] = 1e-6
    maxIterations: Annotated[int, Field(ge=1, le=10_000, description="geometric_median: iteration cap.")] = 100
    tau: Annotated[float, Field(gt=0.0, le=1e9, description="centered_clipping: clipping radius.")] = 1.0
    iterations: Annotated[int, Field(ge=1, le=100, description="centered_clipping: clipping passes per round.")] = 1
    normClip: Annotated[NormClipSpec | None, Field(description="Pre-step before any rule.")] = None
    bucketing: Annotated[BucketingSpec | None, Field(description="Pre-step before a robust rule.")] = None
    nnm: Annotated[
        NNMSpec | None,
        Field(description="Pre-step before any rule: nearest-neighbour mixing (keeps the rule's tolerance)."),
    ] = None
    maxBufferBytes: Annotated[
        int,
        Field(ge=1, le=2**44, description="Largest round buffer (updates x parameters x 4 bytes) a buffered "
                                          "rule, detection or an attack simulation may hold."),
    ] = 4 * 1024**3
    serverOptimizer: ServerOptimizerSpec = ServerOptimizerSpec()

    @model_validator(mode="after")
    @cel("!has(self.nnm) || !has(self.bucketing)",
         "nnm and bucketing are two remedies for the same problem (heterogeneous updates): set one of them",
         field_path=".nnm")
    def _one_mixing_pre_step(self) -> AggregationSpec:
        if self.nnm is not None and self.bucketing is not None:
            raise ValueError("aggregation.nnm and aggregation.bucketing are two remedies for the same problem "
                             "(heterogeneous updates): set one of them (nnm keeps the rule's tolerance, bucketing "
                             "divides it by the bucket size)")
        return self


# ----------------------------------------------------------------------------------------- byzantine


class DetectionSpec(Strict):
    """Score every update each round; updates scoring above `threshold` are left out of that round."""

    method: Annotated[
        Literal["norm", "cosine", "krum"],
        Field(description="norm: robust z-score of the update's norm (median, MAD); cosine: cosine distance to "
                          "the robust aggregate; krum: Krum score relative to the median score."),
    ] = "norm"
    threshold: Annotated[
        float | None,
        Field(gt=0.0, le=1e9, description="Score above which an update is flagged (default: norm 3.5, "
                                          "cosine 0.5, krum 3)."),
    ] = None

    @property
    def effective_threshold(self) -> float:
        if self.threshold is not None:
            return self.threshold
        return {"norm": 3.5, "cosine": 0.5, "krum": 3.0}[self.method]


class ReputationSpec(Strict):
    """A client flagged in `k` of its last `window` rounds is quarantined (not sampled) for `quarantineRounds`."""

    decay: Annotated[float, Field(ge=0.0, le=1.0, description="Weight of the past in the decayed score.")] = 0.9
    k: Annotated[int, Field(ge=1, le=1000, description="Flags within the window that quarantine a client.")] = 2
    window: Annotated[int, Field(ge=1, le=1000, description="Rounds of a client's history looked at (w).")] = 5
    quarantineRounds: Annotated[int, Field(ge=0, le=100_000, description="Rounds a quarantine lasts (q).")] = 5

    @model_validator(mode="after")
    @cel("self.k <= self.window", "k must be <= window", field_path=".k")
    def _k_within_window(self) -> ReputationSpec:
        if self.k > self.window:
            raise ValueError(f"k ({self.k}) must be <= window ({self.window}): a client can be flagged at most "
                             "once per round")
        return self


AttackType = Literal["sign_flip", "scaled", "gaussian", "label_flip", "alie", "ipm", "replay"]


class AttackSpec(Strict):
    """Experiments only: chosen simulated clients misbehave. Never set this in production."""

    type: Annotated[AttackType, Field(description="What the attackers do.")]
    count: Annotated[int | None, Field(ge=0, le=100_000, description="Attacking simulated clients.")] = None
    fraction: Annotated[
        float | None, Field(ge=0.0, le=1.0, description="Share of simulated clients attacking (rounded down).")
    ] = None
    seed: Annotated[int, Field(ge=0, le=2**31 - 1, description="Chooses the attackers.")] = 0
    parameters: Annotated[
        dict[str, float],
        Field(description="scale (sign_flip, default 1), factor (scaled, default 10), std (gaussian, default 1), "
                          "epsilon (ipm, default 0.5), z (alie, default: Baruch et al.'s z_max for n and f)."),
    ] = {}

    @model_validator(mode="after")
    @cel("has(self.count) != has(self.fraction)", "set exactly one of count or fraction")
    def _count_or_fraction(self) -> AttackSpec:
        if (self.count is None) == (self.fraction is None):
            raise ValueError("set exactly one of count or fraction: how many simulated clients attack")
        allowed = {"sign_flip": {"scale"}, "scaled": {"factor"}, "gaussian": {"std"}, "alie": {"z"},
                   "ipm": {"epsilon"}, "label_flip": set(), "replay": set()}[self.type]
        unknown = sorted(set(self.parameters) - allowed)
        if unknown:
            raise ValueError(f"parameters {unknown} do not apply to attack {self.type!r}; "
                             f"it takes {sorted(allowed) or 'none'}")
        return self


class ByzantineSpec(Strict):
    """Byzantine robustness: how many clients may misbehave, how to spot them, and (experiments) an attack."""

    expectedFraction: Annotated[
        float, Field(ge=0.0, lt=1.0, description="Share of a round's updates that may be Byzantine; checked "
                                                 "against what aggregation.rule tolerates.")
    ] = 0.0
    detection: DetectionSpec | None = None
    reputation: ReputationSpec | None = None
    attack: AttackSpec | None = None

    @model_validator(mode="after")
    @cel("!has(self.reputation) || has(self.detection)",
         "reputation counts detection flags: set byzantine.detection too", field_path=".reputation")
    def _reputation_needs_detection(self) -> ByzantineSpec:
        if self.reputation is not None and self.detection is None:
            raise ValueError("reputation counts detection flags: set byzantine.detection too (e.g. method: norm)")
        return self


# --------------------------------------------------------------------------------------- compression

CompressionBits = Literal[2, 4, 8, 32]


DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


class ResidualVolumeSpec(Strict):
    """Where client pods keep their error-feedback residuals in a cluster (one file per client).

    Without a claim each pod gets an emptyDir: it survives a container restart, not the pod's replacement, and
    a simulated client's residual carries over only when the same pod trains it again. A claim survives both;
    for the worker pool it must be ReadWriteMany, since any worker may train any simulated client."""

    persistentVolumeClaim: Annotated[
        str | None,
        Field(max_length=253, pattern=DNS_SUBDOMAIN_PATTERN,
              description="An existing PersistentVolumeClaim in the namespace, mounted by every pod (the "
                          "operator never creates or deletes it). Unset: an emptyDir per pod."),
    ] = None
    sizeLimit: Annotated[
        str | None,
        Field(pattern=QUANTITY_PATTERN, description="The emptyDir's sizeLimit (a pod that exceeds it is evicted): "
                                                    "at least clients trained per pod x parameters x 4 bytes."),
    ] = None

    @model_validator(mode="after")
    @cel("!has(self.persistentVolumeClaim) || !has(self.sizeLimit)",
         "sizeLimit is the emptyDir's: with persistentVolumeClaim set the claim's own size applies; remove sizeLimit",
         field_path=".sizeLimit")
    def _size_limit_for_empty_dir(self) -> ResidualVolumeSpec:
        if self.persistentVolumeClaim is not None and self.sizeLimit is not None:
            raise ValueError("sizeLimit is the emptyDir's: with persistentVolumeClaim set the claim's own size "
                             "applies; remove sizeLimit")
        return self


class UplinkCompressionSpec(Strict):
    """How a client's update (its model minus the global model it trained from) travels to the server."""

    topK: Annotated[
        float,
        Field(gt=0.0, le=1.0, description="Fraction of the update's entries sent: the largest in magnitude "
                                          "(0.01 = top 1%). 1 sends all of them."),
    ] = 1.0
    bits: Annotated[
        CompressionBits,
        Field(description="Quantise the sent values to 8, 4 or 2 bits (stochastic rounding, one scale per "
                          "chunk); 32 sends float32."),
    ] = 32
    errorFeedback: Annotated[
        bool,
        Field(description="Add what compression left out to the client's next update (kept per client)."),
    ] = False
    chunk: Annotated[int, Field(ge=16, le=65536, description="Values that share one quantisation scale.")] = 256
    residuals: Annotated[
        ResidualVolumeSpec | None,
        Field(description="In a cluster, the volume the worker pool keeps error-feedback residuals on (an "
                          "emptyDir per pod unless a claim is named); needs errorFeedback."),
    ] = None

    @property
    def enabled(self) -> bool:
        return self.topK < 1.0 or self.bits < 32

    @model_validator(mode="after")
    @cel("!has(self.residuals) || (has(self.errorFeedback) && self.errorFeedback)",
         "residuals is where error feedback keeps what it left out: set errorFeedback: true, or remove residuals",
         field_path=".residuals")
    def _residuals_need_feedback(self) -> UplinkCompressionSpec:
        if self.residuals is not None and not self.errorFeedback:
            raise ValueError("residuals is where error feedback keeps what it left out: set errorFeedback: true, "
                             "or remove residuals")
        return self

    @model_validator(mode="after")
    @cel("!has(self.errorFeedback) || !self.errorFeedback || (has(self.topK) && self.topK < 1.0) || "
         "(has(self.bits) && self.bits < 32)",
         "errorFeedback needs a lossy uplink: set topK below 1 or bits to 8, 4 or 2", field_path=".errorFeedback")
    def _feedback_needs_loss(self) -> UplinkCompressionSpec:
        if self.errorFeedback and not self.enabled:
            raise ValueError("errorFeedback needs a lossy uplink: set topK below 1 or bits to 8, 4 or 2")
        return self


class DownlinkCompressionSpec(Strict):
    """How the global model travels to a worker that holds a recent version: as quantised deltas."""

    bits: Annotated[
        CompressionBits,
        Field(description="Quantise the delta from the worker's version to 8, 4 or 2 bits; 32 sends the "
                          "full model every round. New workers, and workers further behind than history, get "
                          "the full model."),
    ] = 32
    chunk: Annotated[int, Field(ge=16, le=65536, description="Values that share one quantisation scale.")] = 256
    history: Annotated[
        int,
        Field(ge=1, le=16, description="How many versions behind a worker may be and still get deltas: the "
                                       "server keeps the last `history` steps (about history x parameters x "
                                       "bits / 8 bytes) and sends a worker K behind those K steps, when they are "
                                       "smaller than the full model."),
    ] = 3

    @property
    def enabled(self) -> bool:
        return self.bits < 32


class CompressionSpec(Strict):
    """Compressed updates both ways (top-k, quantisation, error feedback); off by default."""

    uplink: UplinkCompressionSpec = UplinkCompressionSpec()
    downlink: DownlinkCompressionSpec = DownlinkCompressionSpec()


# -------------------------------------------------------------------------------------------- server


class CheckpointSpec(Strict):
    """Where the server keeps its checkpoint; in a cluster, a PersistentVolumeClaim."""

    enabled: bool = True
    size: Annotated[str, Field(pattern=QUANTITY_PATTERN)] = "1Gi"
    storageClassName: str | None = None
    whenDeleted: Annotated[
        Literal["Retain", "Delete"],
        Field(description="The checkpoint volume when the Federation is deleted: Retain keeps it "
                          "(a Federation of the same name resumes from it; delete the claim by hand to start "
                          "over), Delete deletes it with every completed round."),
    ] = "Retain"


class ServerSpec(Strict):
    template: PodTemplate = PodTemplate()
    port: Annotated[int, Field(ge=1024, le=65535, description="gRPC port.")] = 50051
    metricsPort: Annotated[int, Field(ge=1024, le=65535, description="HTTP /metrics, /status, /healthz.")] = 8080
    serviceType: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    checkpoint: CheckpointSpec = CheckpointSpec()
    maxMessageMiB: Annotated[
        int, Field(ge=1, le=2047, description="Largest gRPC message accepted; updates stream in chunks.")
    ] = 8

    @model_validator(mode="after")
    @cel("self.port != self.metricsPort", "port and metricsPort must differ", field_path=".metricsPort")
    def _ports_differ(self) -> ServerSpec:
        if self.port == self.metricsPort:
            raise ValueError(f"port and metricsPort must differ (both are {self.port})")
        return self


class MonitoringSpec(Strict):
    serviceMonitor: Annotated[bool, Field(description="Create a ServiceMonitor when its CRD exists.")] = True
    scrapeInterval: Annotated[str, Field(pattern=r"^[0-9]+(ms|s|m|h)$")] = "15s"
    maxClientSeries: Annotated[
        int, Field(ge=0, le=10_000, description="Simulated clients that get their own per-client metric series "
                                                "(federator_client_anomaly_score); silos always do.")
    ] = 100


# ---------------------------------------------------------------------------------------- federation


class FederationSpec(Strict):
    """Desired state of a federated learning run."""

    rounds: Annotated[int, Field(ge=1, le=100_000, description="Number of federated rounds.")]
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    training: TrainingSpec = TrainingSpec()
    clients: ClientsSpec = ClientsSpec()
    aggregation: AggregationSpec = AggregationSpec()
    byzantine: ByzantineSpec = ByzantineSpec()
    compression: CompressionSpec = CompressionSpec()
    server: ServerSpec = ServerSpec()
    monitoring: MonitoringSpec = MonitoringSpec()

    @model_validator(mode="after")
    # CEL restates the part it expresses simply: fedavg tolerates no Byzantine client. The rest (each robust
    # rule's limit) is checked by the model, so by `federator validate` and the operator.
    @cel("!has(self.byzantine) || !has(self.byzantine.expectedFraction) || self.byzantine.expectedFraction == 0.0 || "
         "(has(self.aggregation) && has(self.aggregation.rule) && self.aggregation.rule != 'fedavg')",
         "aggregation.rule fedavg tolerates no Byzantine client: with byzantine.expectedFraction > 0 use a robust "
         "rule (median, trimmed_mean, krum, multi_krum, geometric_median, centered_clipping)",
         field_path=".byzantine.expectedFraction")
    def _byzantine_within_tolerance(self) -> FederationSpec:
        problem = tolerance_problem(self)
        if problem:
            raise ValueError(problem)
        return self


Phase = Literal["Pending", "Running", "Succeeded", "Failed"]
ConditionType = Literal["Ready", "Progressing", "Degraded"]


class Condition(BaseModel):
    """A Kubernetes-style condition."""

    model_config = ConfigDict(extra="forbid")

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    lastTransitionTime: str | None = None
    observedGeneration: int | None = None


class ClientCounts(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ready: int = 0
    participants: int = 0


class FlaggedClient(BaseModel):
    """A client whose updates the server flagged as anomalous (byzantine.detection)."""

    model_config = ConfigDict(extra="forbid")

    client: str
    reason: str  # the detection method that flagged it: norm, cosine or krum
    rounds: int = 0  # rounds it was flagged in
    lastRound: int | None = None
    quarantined: bool = False


MAX_FLAGGED_IN_STATUS = 20  # the Federation status lists at most this many (most often flagged first)


class FederationStatus(BaseModel):
    """Observed state, written by the operator to the /status subresource."""

    model_config = ConfigDict(extra="forbid")

    phase: Phase = "Pending"
    round: int = 0
    rounds: int | None = None
    accuracy: float | None = None
    loss: float | None = None
    epsilon: float | None = None
    clients: ClientCounts = ClientCounts()
    byzantineFlagged: int = 0
    flaggedClients: Annotated[
        list[FlaggedClient], Field(max_length=MAX_FLAGGED_IN_STATUS, description="Most often flagged clients.")
    ] = []
    compressionRatio: float | None = None
    observedGeneration: int | None = None
    conditions: list[Condition] = []


class ObjectMeta(BaseModel):
    """The part of metadata that Federator reads; everything else is kept as given."""

    model_config = ConfigDict(extra="allow")

    name: Annotated[str, Field(
        min_length=1, max_length=MAX_NAME_LENGTH, pattern=DNS_LABEL_PATTERN,
        description=f"At most {MAX_NAME_LENGTH} characters: children append suffixes (see federator/api/names.py).")]
    namespace: Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN)] = "default"
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}


class Federation(BaseModel):
    """A whole Federation manifest (apiVersion, kind, metadata, spec)."""

    model_config = ConfigDict(extra="forbid")

    apiVersion: Literal["federator.dev/v1alpha1"]
    kind: Literal["Federation"]
    metadata: ObjectMeta
    spec: FederationSpec
    status: FederationStatus | None = None


# ----------------------------------------------------------------------------------- federated client


class VolumeSource(Strict):
    """Where a silo's data lives: an existing PersistentVolumeClaim or a host path."""

    persistentVolumeClaim: Annotated[str | None, Field(pattern=DNS_LABEL_PATTERN)] = None
    hostPath: str | None = None

    @model_validator(mode="after")
    @cel("has(self.persistentVolumeClaim) != has(self.hostPath)",
         "set exactly one of persistentVolumeClaim or hostPath")
    def _exactly_one(self) -> VolumeSource:
        if (self.persistentVolumeClaim is None) == (self.hostPath is None):
            raise ValueError("set exactly one of persistentVolumeClaim or hostPath")
        return self


class SiloDataSpec(Strict):
    """A silo's own data: a volume mounted at /data and a file in it."""

    volume: VolumeSource
    format: Literal["npz", "csv", "imagefolder"] = "npz"
    path: Annotated[str, Field(min_length=1, description="Path inside the volume, e.g. train.npz.")] = "data.npz"
    labelColumn: str = "label"


class FederationRef(Strict):
    name: Annotated[str, Field(min_length=1, max_length=MAX_NAME_LENGTH, pattern=DNS_LABEL_PATTERN)]


class FederatedClientSpec(Strict):
    """An organisation's own client: one identity with its own data."""

    federationRef: FederationRef
    replicas: Annotated[
        int, Field(ge=0, le=100, description="Pods serving this silo's tasks (one identity); 0 pauses it.")
    ] = 1
    data: SiloDataSpec
    template: PodTemplate = PodTemplate()
    residuals: Annotated[
        ResidualVolumeSpec | None,
        Field(description="The volume this silo's pods keep its error-feedback residual on while the "
                          "Federation's uplink has errorFeedback (default an emptyDir per pod). The residual is "
                          "derived from the silo's data: it never goes to the worker pool's claim."),
    ] = None


class FederatedClientStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")

    replicas: int = 0
    selector: str = ""
    joined: bool = False
    roundsParticipated: int = 0
    lastUpdateTime: str | None = None
    flagged: bool = False
    observedGeneration: int | None = None
    conditions: list[Condition] = []


class FederatedClient(BaseModel):
    model_config = ConfigDict(extra="forbid")

    apiVersion: Literal["federator.dev/v1alpha1"]
    kind: Literal["FederatedClient"]
    metadata: ObjectMeta
    spec: FederatedClientSpec
    status: FederatedClientStatus | None = None


def is_custom_model(name: str) -> bool:
    return re.match(CUSTOM_MODEL_PATTERN, name) is not None
