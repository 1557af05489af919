from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReplicaState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPLICA_STATE_UNSPECIFIED: _ClassVar[ReplicaState]
    STARTING: _ClassVar[ReplicaState]
    RUNNING: _ClassVar[ReplicaState]
    UNHEALTHY: _ClassVar[ReplicaState]
    STOPPING: _ClassVar[ReplicaState]
    STOPPED: _ClassVar[ReplicaState]
REPLICA_STATE_UNSPECIFIED: ReplicaState
STARTING: ReplicaState
RUNNING: ReplicaState
UNHEALTHY: ReplicaState
STOPPING: ReplicaState
STOPPED: ReplicaState

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "host", "cpus", "memory_gib", "gpus", "metrics_address")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_GIB_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    host: str
    cpus: float
    memory_gib: float
    gpus: int
    metrics_address: str
    def __init__(self, node_id: _Optional[str] = ..., host: _Optional[str] = ..., cpus: _Optional[float] = ..., memory_gib: _Optional[float] = ..., gpus: _Optional[int] = ..., metrics_address: _Optional[str] = ...) -> None: ...

class ReplicaLoad(_message.Message):
    __slots__ = ("running", "waiting", "kv_cache_usage")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_USAGE_FIELD_NUMBER: _ClassVar[int]
    running: int
    waiting: int
    kv_cache_usage: float
    def __init__(self, running: _Optional[int] = ..., waiting: _Optional[int] = ..., kv_cache_usage: _Optional[float] = ...) -> None: ...

class ReplicaStatus(_message.Message):
    __slots__ = ("replica_id", "deployment", "state", "address", "metrics_address", "pid", "restarts", "load", "message")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    deployment: str
    state: ReplicaState
    address: str
    metrics_address: str
    pid: int
    restarts: int
    load: ReplicaLoad
    message: str
    def __init__(self, replica_id: _Optional[str] = ..., deployment: _Optional[str] = ..., state: _Optional[_Union[ReplicaState, str]] = ..., address: _Optional[str] = ..., metrics_address: _Optional[str] = ..., pid: _Optional[int] = ..., restarts: _Optional[int] = ..., load: _Optional[_Union[ReplicaLoad, _Mapping]] = ..., message: _Optional[str] = ...) -> None: ...

class ReplicaAssignment(_message.Message):
    __slots__ = ("replica_id", "deployment", "deployment_json", "keep", "drain_timeout_s")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_JSON_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    DRAIN_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    deployment: str
    deployment_json: str
    keep: bool
    drain_timeout_s: float
    def __init__(self, replica_id: _Optional[str] = ..., deployment: _Optional[str] = ..., deployment_json: _Optional[str] = ..., keep: _Optional[bool] = ..., drain_timeout_s: _Optional[float] = ...) -> None: ...

class RegisterNodeRequest(_message.Message):
    __slots__ = ("node", "replicas")
    NODE_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    node: NodeInfo
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaStatus]
    def __init__(self, node: _Optional[_Union[NodeInfo, _Mapping]] = ..., replicas: _Optional[_Iterable[_Union[ReplicaStatus, _Mapping]]] = ...) -> None: ...

class RegisterNodeResponse(_message.Message):
    __slots__ = ("heartbeat_interval_s", "assignments")
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_s: float
    assignments: _containers.RepeatedCompositeFieldContainer[ReplicaAssignment]
    def __init__(self, heartbeat_interval_s: _Optional[float] = ..., assignments: _Optional[_Iterable[_Union[ReplicaAssignment, _Mapping]]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "replicas")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaStatus]
    def __init__(self, node_id: _Optional[str] = ..., replicas: _Optional[_Iterable[_Union[ReplicaStatus, _Mapping]]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("known", "assignments")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    known: bool
    assignments: _containers.RepeatedCompositeFieldContainer[ReplicaAssignment]
    def __init__(self, known: _Optional[bool] = ..., assignments: _Optional[_Iterable[_Union[ReplicaAssignment, _Mapping]]] = ...) -> None: ...

class Route(_message.Message):
    __slots__ = ("replica_id", "address", "node_id", "metrics_address")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    address: str
    node_id: str
    metrics_address: str
    def __init__(self, replica_id: _Optional[str] = ..., address: _Optional[str] = ..., node_id: _Optional[str] = ..., metrics_address: _Optional[str] = ...) -> None: ...

class ModelRoutes(_message.Message):
    __slots__ = ("model", "strategy", "max_in_flight", "max_queue", "max_tokens", "routes", "autoscaled", "cold_start_timeout_s", "unavailable", "response_cache_ttl_s", "coalesce")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    AUTOSCALED_FIELD_NUMBER: _ClassVar[int]
    COLD_START_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_CACHE_TTL_S_FIELD_NUMBER: _ClassVar[int]
    COALESCE_FIELD_NUMBER: _ClassVar[int]
    model: str
    strategy: str
    max_in_flight: int
    max_queue: int
    max_tokens: int
    routes: _containers.RepeatedCompositeFieldContainer[Route]
    autoscaled: bool
    cold_start_timeout_s: float
    unavailable: str
    response_cache_ttl_s: float
    coalesce: bool
    def __init__(self, model: _Optional[str] = ..., strategy: _Optional[str] = ..., max_in_flight: _Optional[int] = ..., max_queue: _Optional[int] = ..., max_tokens: _Optional[int] = ..., routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ..., autoscaled: _Optional[bool] = ..., cold_start_timeout_s: _Optional[float] = ..., unavailable: _Optional[str] = ..., response_cache_ttl_s: _Optional[float] = ..., coalesce: _Optional[bool] = ...) -> None: ...

class RoutingTable(_message.Message):
    __slots__ = ("version", "models")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    version: int
    models: _containers.RepeatedCompositeFieldContainer[ModelRoutes]
    def __init__(self, version: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ModelRoutes, _Mapping]]] = ...) -> None: ...

class WatchRoutesRequest(_message.Message):
    __slots__ = ("known_version", "watcher_id")
    KNOWN_VERSION_FIELD_NUMBER: _ClassVar[int]
    WATCHER_ID_FIELD_NUMBER: _ClassVar[int]
    known_version: int
    watcher_id: str
    def __init__(self, known_version: _Optional[int] = ..., watcher_id: _Optional[str] = ...) -> None: ...

class AutoscalingStatus(_message.Message):
    __slots__ = ("min_replicas", "max_replicas", "ongoing_requests", "held_requests", "last_direction", "last_reason", "last_change_unix")
    MIN_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    ONGOING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    HELD_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    LAST_DIRECTION_FIELD_NUMBER: _ClassVar[int]
    LAST_REASON_FIELD_NUMBER: _ClassVar[int]
    LAST_CHANGE_UNIX_FIELD_NUMBER: _ClassVar[int]
    min_replicas: int
    max_replicas: int
    ongoing_requests: float
    held_requests: int
    last_direction: str
    last_reason: str
    last_change_unix: float
    def __init__(self, min_replicas: _Optional[int] = ..., max_replicas: _Optional[int] = ..., ongoing_requests: _Optional[float] = ..., held_requests: _Optional[int] = ..., last_direction: _Optional[str] = ..., last_reason: _Optional[str] = ..., last_change_unix: _Optional[float] = ...) -> None: ...

class DeploymentStatus(_message.Message):
    __slots__ = ("name", "target_replicas", "running_replicas", "engine", "model_source", "strategy", "autoscaling")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TARGET_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    MODEL_SOURCE_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    AUTOSCALING_FIELD_NUMBER: _ClassVar[int]
    name: str
    target_replicas: int
    running_replicas: int
    engine: str
    model_source: str
    strategy: str
    autoscaling: AutoscalingStatus
    def __init__(self, name: _Optional[str] = ..., target_replicas: _Optional[int] = ..., running_replicas: _Optional[int] = ..., engine: _Optional[str] = ..., model_source: _Optional[str] = ..., strategy: _Optional[str] = ..., autoscaling: _Optional[_Union[AutoscalingStatus, _Mapping]] = ...) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("node", "alive", "last_heartbeat_unix")
    NODE_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_UNIX_FIELD_NUMBER: _ClassVar[int]
    node: NodeInfo
    alive: bool
    last_heartbeat_unix: float
    def __init__(self, node: _Optional[_Union[NodeInfo, _Mapping]] = ..., alive: _Optional[bool] = ..., last_heartbeat_unix: _Optional[float] = ...) -> None: ...

class ReplicaView(_message.Message):
    __slots__ = ("status", "node_id", "keep")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    status: ReplicaStatus
    node_id: str
    keep: bool
    def __init__(self, status: _Optional[_Union[ReplicaStatus, _Mapping]] = ..., node_id: _Optional[str] = ..., keep: _Optional[bool] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("nodes", "deployments", "replicas", "routing_version")
    NODES_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    ROUTING_VERSION_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    deployments: _containers.RepeatedCompositeFieldContainer[DeploymentStatus]
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaView]
    routing_version: int
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ..., deployments: _Optional[_Iterable[_Union[DeploymentStatus, _Mapping]]] = ..., replicas: _Optional[_Iterable[_Union[ReplicaView, _Mapping]]] = ..., routing_version: _Optional[int] = ...) -> None: ...

class ScaleRequest(_message.Message):
    __slots__ = ("deployment", "replicas")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    replicas: int
    def __init__(self, deployment: _Optional[str] = ..., replicas: _Optional[int] = ...) -> None: ...

class ScaleResponse(_message.Message):
    __slots__ = ("deployment",)
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    deployment: DeploymentStatus
    def __init__(self, deployment: _Optional[_Union[DeploymentStatus, _Mapping]] = ...) -> None: ...

class ModelLoad(_message.Message):
    __slots__ = ("model", "in_flight", "queued", "held", "ttft_p95_s", "ttft_samples")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    TTFT_P95_S_FIELD_NUMBER: _ClassVar[int]
    TTFT_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    model: str
    in_flight: int
    queued: int
    held: int
    ttft_p95_s: float
    ttft_samples: int
    def __init__(self, model: _Optional[str] = ..., in_flight: _Optional[int] = ..., queued: _Optional[int] = ..., held: _Optional[int] = ..., ttft_p95_s: _Optional[float] = ..., ttft_samples: _Optional[int] = ...) -> None: ...

class ReportLoadRequest(_message.Message):
    __slots__ = ("gateway_id", "models")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    models: _containers.RepeatedCompositeFieldContainer[ModelLoad]
    def __init__(self, gateway_id: _Optional[str] = ..., models: _Optional[_Iterable[_Union[ModelLoad, _Mapping]]] = ...) -> None: ...

class ReportLoadResponse(_message.Message):
    __slots__ = ("expires_after_s",)
    EXPIRES_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    expires_after_s: float
    def __init__(self, expires_after_s: _Optional[float] = ...) -> None: ...

class ApplyConfigRequest(_message.Message):
    __slots__ = ("config_text",)
    CONFIG_TEXT_FIELD_NUMBER: _ClassVar[int]
    config_text: str
    def __init__(self, config_text: _Optional[str] = ...) -> None: ...

class ApplyConfigResponse(_message.Message):
    __slots__ = ("deployments",)
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    deployments: _containers.RepeatedCompositeFieldContainer[DeploymentStatus]
    def __init__(self, deployments: _Optional[_Iterable[_Union[DeploymentStatus, _Mapping]]] = ...) -> None: ...
