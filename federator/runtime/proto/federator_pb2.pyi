from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "offset", "nbytes", "crc32")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    nbytes: int
    crc32: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ..., crc32: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("offset", "data", "crc32")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    crc32: int
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., crc32: _Optional[int] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("token", "worker_name", "silo", "silo_samples", "feature_stats")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    WORKER_NAME_FIELD_NUMBER: _ClassVar[int]
    SILO_FIELD_NUMBER: _ClassVar[int]
    SILO_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_STATS_FIELD_NUMBER: _ClassVar[int]
    token: str
    worker_name: str
    silo: str
    silo_samples: int
    feature_stats: FeatureStats
    def __init__(self, token: _Optional[str] = ..., worker_name: _Optional[str] = ..., silo: _Optional[str] = ..., silo_samples: _Optional[int] = ..., feature_stats: _Optional[_Union[FeatureStats, _Mapping]] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("worker_id", "heartbeat_seconds", "federation", "chunk_bytes", "input_shape", "num_classes")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    heartbeat_seconds: int
    federation: str
    chunk_bytes: int
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    num_classes: int
    def __init__(self, worker_id: _Optional[str] = ..., heartbeat_seconds: _Optional[int] = ..., federation: _Optional[str] = ..., chunk_bytes: _Optional[int] = ..., input_shape: _Optional[_Iterable[int]] = ..., num_classes: _Optional[int] = ...) -> None: ...

class TaskRequest(_message.Message):
    __slots__ = ("token", "worker_id", "have_version", "wait_seconds", "max_tasks")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    HAVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TASKS_FIELD_NUMBER: _ClassVar[int]
    token: str
    worker_id: str
    have_version: int
    wait_seconds: float
    max_tasks: int
    def __init__(self, token: _Optional[str] = ..., worker_id: _Optional[str] = ..., have_version: _Optional[int] = ..., wait_seconds: _Optional[float] = ..., max_tasks: _Optional[int] = ...) -> None: ...

class BatchTask(_message.Message):
    __slots__ = ("task_id", "client_id")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    client_id: str
    def __init__(self, task_id: _Optional[str] = ..., client_id: _Optional[str] = ...) -> None: ...

class TaskHeader(_message.Message):
    __slots__ = ("kind", "task_id", "round", "client_id", "version", "weights_included", "tensors", "total_bytes", "config_json", "reason", "compressed", "delta_base", "normalization", "more")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        NONE: _ClassVar[TaskHeader.Kind]
        TRAIN: _ClassVar[TaskHeader.Kind]
        STOP: _ClassVar[TaskHeader.Kind]
    NONE: TaskHeader.Kind
    TRAIN: TaskHeader.Kind
    STOP: TaskHeader.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_INCLUDED_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    COMPRESSED_FIELD_NUMBER: _ClassVar[int]
    DELTA_BASE_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    kind: TaskHeader.Kind
    task_id: str
    round: int
    client_id: str
    version: int
    weights_included: bool
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    total_bytes: int
    config_json: str
    reason: str
    compressed: bool
    delta_base: int
    normalization: Normalization
    more: _containers.RepeatedCompositeFieldContainer[BatchTask]
    def __init__(self, kind: _Optional[_Union[TaskHeader.Kind, str]] = ..., task_id: _Optional[str] = ..., round: _Optional[int] = ..., client_id: _Optional[str] = ..., version: _Optional[int] = ..., weights_included: _Optional[bool] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., config_json: _Optional[str] = ..., reason: _Optional[str] = ..., compressed: _Optional[bool] = ..., delta_base: _Optional[int] = ..., normalization: _Optional[_Union[Normalization, _Mapping]] = ..., more: _Optional[_Iterable[_Union[BatchTask, _Mapping]]] = ...) -> None: ...

class TaskMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: TaskHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[TaskHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("token", "worker_id", "task_id", "round", "client_id", "base_version", "num_samples", "train_loss", "train_seconds", "tensors", "total_bytes", "compressed")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPRESSED_FIELD_NUMBER: _ClassVar[int]
    token: str
    worker_id: str
    task_id: str
    round: int
    client_id: str
    base_version: int
    num_samples: int
    train_loss: float
    train_seconds: float
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    total_bytes: int
    compressed: bool
    def __init__(self, token: _Optional[str] = ..., worker_id: _Optional[str] = ..., task_id: _Optional[str] = ..., round: _Optional[int] = ..., client_id: _Optional[str] = ..., base_version: _Optional[int] = ..., num_samples: _Optional[int] = ..., train_loss: _Optional[float] = ..., train_seconds: _Optional[float] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., compressed: _Optional[bool] = ...) -> None: ...

class UpdateMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("accepted", "reason", "detail", "revoked")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    detail: str
    revoked: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., detail: _Optional[str] = ..., revoked: _Optional[_Iterable[str]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("token", "worker_id", "task_id")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    token: str
    worker_id: str
    task_id: str
    def __init__(self, token: _Optional[str] = ..., worker_id: _Optional[str] = ..., task_id: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("known", "task_valid", "revoked")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    TASK_VALID_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    known: bool
    task_valid: bool
    revoked: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, known: _Optional[bool] = ..., task_valid: _Optional[bool] = ..., revoked: _Optional[_Iterable[str]] = ...) -> None: ...

class FeatureStats(_message.Message):
    __slots__ = ("count", "shape", "sum", "sum_squares", "min", "max")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    SUM_SQUARES_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    count: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    sum: _containers.RepeatedScalarFieldContainer[float]
    sum_squares: _containers.RepeatedScalarFieldContainer[float]
    min: _containers.RepeatedScalarFieldContainer[float]
    max: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, count: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., sum: _Optional[_Iterable[float]] = ..., sum_squares: _Optional[_Iterable[float]] = ..., min: _Optional[_Iterable[float]] = ..., max: _Optional[_Iterable[float]] = ...) -> None: ...

class Normalization(_message.Message):
    __slots__ = ("mode", "shape", "shift", "scale")
    MODE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    SHIFT_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    mode: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    shift: _containers.RepeatedScalarFieldContainer[float]
    scale: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, mode: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., shift: _Optional[_Iterable[float]] = ..., scale: _Optional[_Iterable[float]] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("token", "worker_id")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    token: str
    worker_id: str
    def __init__(self, token: _Optional[str] = ..., worker_id: _Optional[str] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
