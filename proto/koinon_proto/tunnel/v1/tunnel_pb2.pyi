from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Gpu(_message.Message):
    __slots__ = ("model", "memory_mib")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    model: str
    memory_mib: int
    def __init__(self, model: _Optional[str] = ..., memory_mib: _Optional[int] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("token", "name_hint", "region", "gpus", "agent_version", "previous_credential", "join_id")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    NAME_HINT_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    JOIN_ID_FIELD_NUMBER: _ClassVar[int]
    token: str
    name_hint: str
    region: str
    gpus: _containers.RepeatedCompositeFieldContainer[Gpu]
    agent_version: str
    previous_credential: str
    join_id: str
    def __init__(self, token: _Optional[str] = ..., name_hint: _Optional[str] = ..., region: _Optional[str] = ..., gpus: _Optional[_Iterable[_Union[Gpu, _Mapping]]] = ..., agent_version: _Optional[str] = ..., previous_credential: _Optional[str] = ..., join_id: _Optional[str] = ...) -> None: ...

class PortBlock(_message.Message):
    __slots__ = ("node_manager_port", "object_manager_port", "dashboard_agent_grpc_port", "dashboard_agent_listen_port", "metrics_export_port", "runtime_env_agent_port", "min_worker_port", "max_worker_port")
    NODE_MANAGER_PORT_FIELD_NUMBER: _ClassVar[int]
    OBJECT_MANAGER_PORT_FIELD_NUMBER: _ClassVar[int]
    DASHBOARD_AGENT_GRPC_PORT_FIELD_NUMBER: _ClassVar[int]
    DASHBOARD_AGENT_LISTEN_PORT_FIELD_NUMBER: _ClassVar[int]
    METRICS_EXPORT_PORT_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_ENV_AGENT_PORT_FIELD_NUMBER: _ClassVar[int]
    MIN_WORKER_PORT_FIELD_NUMBER: _ClassVar[int]
    MAX_WORKER_PORT_FIELD_NUMBER: _ClassVar[int]
    node_manager_port: int
    object_manager_port: int
    dashboard_agent_grpc_port: int
    dashboard_agent_listen_port: int
    metrics_export_port: int
    runtime_env_agent_port: int
    min_worker_port: int
    max_worker_port: int
    def __init__(self, node_manager_port: _Optional[int] = ..., object_manager_port: _Optional[int] = ..., dashboard_agent_grpc_port: _Optional[int] = ..., dashboard_agent_listen_port: _Optional[int] = ..., metrics_export_port: _Optional[int] = ..., runtime_env_agent_port: _Optional[int] = ..., min_worker_port: _Optional[int] = ..., max_worker_port: _Optional[int] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("node_name", "address", "ports", "ray_address", "ray_auth_token", "heartbeat_interval_ms", "heartbeat_timeout_ms", "rtt_probe_interval_ms")
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORTS_FIELD_NUMBER: _ClassVar[int]
    RAY_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RAY_AUTH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    RTT_PROBE_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    address: str
    ports: PortBlock
    ray_address: str
    ray_auth_token: str
    heartbeat_interval_ms: int
    heartbeat_timeout_ms: int
    rtt_probe_interval_ms: int
    def __init__(self, node_name: _Optional[str] = ..., address: _Optional[str] = ..., ports: _Optional[_Union[PortBlock, _Mapping]] = ..., ray_address: _Optional[str] = ..., ray_auth_token: _Optional[str] = ..., heartbeat_interval_ms: _Optional[int] = ..., heartbeat_timeout_ms: _Optional[int] = ..., rtt_probe_interval_ms: _Optional[int] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("credential", "assignment", "credential_expires_at")
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    credential: str
    assignment: Assignment
    credential_expires_at: int
    def __init__(self, credential: _Optional[str] = ..., assignment: _Optional[_Union[Assignment, _Mapping]] = ..., credential_expires_at: _Optional[int] = ...) -> None: ...

class Register(_message.Message):
    __slots__ = ("node_name", "address", "gpus", "agent_version", "session_epoch", "self_heartbeats")
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_EPOCH_FIELD_NUMBER: _ClassVar[int]
    SELF_HEARTBEATS_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    address: str
    gpus: _containers.RepeatedCompositeFieldContainer[Gpu]
    agent_version: str
    session_epoch: int
    self_heartbeats: bool
    def __init__(self, node_name: _Optional[str] = ..., address: _Optional[str] = ..., gpus: _Optional[_Iterable[_Union[Gpu, _Mapping]]] = ..., agent_version: _Optional[str] = ..., session_epoch: _Optional[int] = ..., self_heartbeats: _Optional[bool] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("seq", "echo_gateway_time_ns", "echo_seq", "ray_node_id", "ray_state", "gpus")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ECHO_GATEWAY_TIME_NS_FIELD_NUMBER: _ClassVar[int]
    ECHO_SEQ_FIELD_NUMBER: _ClassVar[int]
    RAY_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    RAY_STATE_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    echo_gateway_time_ns: int
    echo_seq: int
    ray_node_id: str
    ray_state: str
    gpus: _containers.RepeatedCompositeFieldContainer[Gpu]
    def __init__(self, seq: _Optional[int] = ..., echo_gateway_time_ns: _Optional[int] = ..., echo_seq: _Optional[int] = ..., ray_node_id: _Optional[str] = ..., ray_state: _Optional[str] = ..., gpus: _Optional[_Iterable[_Union[Gpu, _Mapping]]] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("reason", "grace_seconds")
    REASON_FIELD_NUMBER: _ClassVar[int]
    GRACE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    reason: str
    grace_seconds: int
    def __init__(self, reason: _Optional[str] = ..., grace_seconds: _Optional[int] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("register", "heartbeat", "drain")
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    register: Register
    heartbeat: Heartbeat
    drain: DrainRequest
    def __init__(self, register: _Optional[_Union[Register, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., drain: _Optional[_Union[DrainRequest, _Mapping]] = ...) -> None: ...

class Registered(_message.Message):
    __slots__ = ("assignment",)
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    assignment: Assignment
    def __init__(self, assignment: _Optional[_Union[Assignment, _Mapping]] = ...) -> None: ...

class Ping(_message.Message):
    __slots__ = ("seq", "gateway_time_ns")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_TIME_NS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    gateway_time_ns: int
    def __init__(self, seq: _Optional[int] = ..., gateway_time_ns: _Optional[int] = ...) -> None: ...

class OpenConnection(_message.Message):
    __slots__ = ("connection_id", "port", "source")
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    connection_id: int
    port: int
    source: str
    def __init__(self, connection_id: _Optional[int] = ..., port: _Optional[int] = ..., source: _Optional[str] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class CredentialRenewal(_message.Message):
    __slots__ = ("credential", "expires_at")
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    credential: str
    expires_at: int
    def __init__(self, credential: _Optional[str] = ..., expires_at: _Optional[int] = ...) -> None: ...

class GatewayMessage(_message.Message):
    __slots__ = ("registered", "ping", "open_connection", "drain", "error", "credential")
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    OPEN_CONNECTION_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    registered: Registered
    ping: Ping
    open_connection: OpenConnection
    drain: DrainRequest
    error: Error
    credential: CredentialRenewal
    def __init__(self, registered: _Optional[_Union[Registered, _Mapping]] = ..., ping: _Optional[_Union[Ping, _Mapping]] = ..., open_connection: _Optional[_Union[OpenConnection, _Mapping]] = ..., drain: _Optional[_Union[DrainRequest, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., credential: _Optional[_Union[CredentialRenewal, _Mapping]] = ...) -> None: ...

class Dial(_message.Message):
    __slots__ = ("host", "port")
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    host: str
    port: int
    def __init__(self, host: _Optional[str] = ..., port: _Optional[int] = ...) -> None: ...

class Accept(_message.Message):
    __slots__ = ("connection_id",)
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    connection_id: int
    def __init__(self, connection_id: _Optional[int] = ...) -> None: ...

class DialResult(_message.Message):
    __slots__ = ("ok", "reason", "message")
    OK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    reason: str
    message: str
    def __init__(self, ok: _Optional[bool] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class Data(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class CloseWrite(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Close(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("dial", "accept", "dial_result", "data", "close_write", "close")
    DIAL_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_FIELD_NUMBER: _ClassVar[int]
    DIAL_RESULT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CLOSE_WRITE_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    dial: Dial
    accept: Accept
    dial_result: DialResult
    data: Data
    close_write: CloseWrite
    close: Close
    def __init__(self, dial: _Optional[_Union[Dial, _Mapping]] = ..., accept: _Optional[_Union[Accept, _Mapping]] = ..., dial_result: _Optional[_Union[DialResult, _Mapping]] = ..., data: _Optional[_Union[Data, _Mapping]] = ..., close_write: _Optional[_Union[CloseWrite, _Mapping]] = ..., close: _Optional[_Union[Close, _Mapping]] = ...) -> None: ...
