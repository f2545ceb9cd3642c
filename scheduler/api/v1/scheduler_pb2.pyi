from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SamplingParams(_message.Message):
    __slots__ = ("max_new_tokens", "temperature", "top_p", "top_k", "stop", "seed")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    seed: int
    def __init__(self, max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., seed: _Optional[int] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "text", "input_ids", "sampling", "class_hint", "conversation_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    CLASS_HINT_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    input_ids: TokenIds
    sampling: SamplingParams
    class_hint: str
    conversation_id: str
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., input_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., class_hint: _Optional[str] = ..., conversation_id: _Optional[str] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ChatRequest(_message.Message):
    __slots__ = ("request_id", "messages", "sampling", "class_hint", "conversation_id", "model")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    CLASS_HINT_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    sampling: SamplingParams
    class_hint: str
    conversation_id: str
    model: str
    def __init__(self, request_id: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., class_hint: _Optional[str] = ..., conversation_id: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class ChatResponse(_message.Message):
    __slots__ = ("request_id", "message", "info")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    message: ChatMessage
    info: RequestInfo
    def __init__(self, request_id: _Optional[str] = ..., message: _Optional[_Union[ChatMessage, _Mapping]] = ..., info: _Optional[_Union[RequestInfo, _Mapping]] = ...) -> None: ...

class ChatChunk(_message.Message):
    __slots__ = ("request_id", "content", "finished", "info")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    content: str
    finished: bool
    info: RequestInfo
    def __init__(self, request_id: _Optional[str] = ..., content: _Optional[str] = ..., finished: _Optional[bool] = ..., info: _Optional[_Union[RequestInfo, _Mapping]] = ...) -> None: ...

class RequestInfo(_message.Message):
    __slots__ = ("dp_rank", "node", "predicted_class", "prediction_source", "prompt_tokens", "completion_tokens", "finish_reason", "queue_seconds", "ttft_seconds", "total_seconds", "attempts", "local_fraction", "inter_node_bytes", "instance", "prefill_instance", "prefill_dp_rank")
    DP_RANK_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_CLASS_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_SOURCE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TTFT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FRACTION_FIELD_NUMBER: _ClassVar[int]
    INTER_NODE_BYTES_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_DP_RANK_FIELD_NUMBER: _ClassVar[int]
    dp_rank: int
    node: int
    predicted_class: str
    prediction_source: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    queue_seconds: float
    ttft_seconds: float
    total_seconds: float
    attempts: int
    local_fraction: float
    inter_node_bytes: float
    instance: str
    prefill_instance: str
    prefill_dp_rank: int
    def __init__(self, dp_rank: _Optional[int] = ..., node: _Optional[int] = ..., predicted_class: _Optional[str] = ..., prediction_source: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., finish_reason: _Optional[str] = ..., queue_seconds: _Optional[float] = ..., ttft_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ..., attempts: _Optional[int] = ..., local_fraction: _Optional[float] = ..., inter_node_bytes: _Optional[float] = ..., instance: _Optional[str] = ..., prefill_instance: _Optional[str] = ..., prefill_dp_rank: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "text", "output_ids", "info")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    output_ids: _containers.RepeatedScalarFieldContainer[int]
    info: RequestInfo
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., output_ids: _Optional[_Iterable[int]] = ..., info: _Optional[_Union[RequestInfo, _Mapping]] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("request_id", "text", "output_ids", "finished", "info")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    output_ids: _containers.RepeatedScalarFieldContainer[int]
    finished: bool
    info: RequestInfo
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., output_ids: _Optional[_Iterable[int]] = ..., finished: _Optional[bool] = ..., info: _Optional[_Union[RequestInfo, _Mapping]] = ...) -> None: ...

class GetPlacementRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetPlacementResponse(_message.Message):
    __slots__ = ("version", "nodes", "gpus_per_node", "model", "policy", "expert_location_json", "plan_json", "instances")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    GPUS_PER_NODE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    EXPERT_LOCATION_JSON_FIELD_NUMBER: _ClassVar[int]
    PLAN_JSON_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    version: str
    nodes: int
    gpus_per_node: int
    model: str
    policy: str
    expert_location_json: str
    plan_json: str
    instances: _containers.RepeatedCompositeFieldContainer[InstancePlacement]
    def __init__(self, version: _Optional[str] = ..., nodes: _Optional[int] = ..., gpus_per_node: _Optional[int] = ..., model: _Optional[str] = ..., policy: _Optional[str] = ..., expert_location_json: _Optional[str] = ..., plan_json: _Optional[str] = ..., instances: _Optional[_Iterable[_Union[InstancePlacement, _Mapping]]] = ...) -> None: ...

class InstancePlacement(_message.Message):
    __slots__ = ("name", "url", "role", "version", "nodes", "gpus_per_node", "sglang_version", "expert_location_json", "plan_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    GPUS_PER_NODE_FIELD_NUMBER: _ClassVar[int]
    SGLANG_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPERT_LOCATION_JSON_FIELD_NUMBER: _ClassVar[int]
    PLAN_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    url: str
    role: str
    version: str
    nodes: int
    gpus_per_node: int
    sglang_version: str
    expert_location_json: str
    plan_json: str
    def __init__(self, name: _Optional[str] = ..., url: _Optional[str] = ..., role: _Optional[str] = ..., version: _Optional[str] = ..., nodes: _Optional[int] = ..., gpus_per_node: _Optional[int] = ..., sglang_version: _Optional[str] = ..., expert_location_json: _Optional[str] = ..., plan_json: _Optional[str] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RankStats(_message.Message):
    __slots__ = ("rank", "node", "healthy", "in_flight", "capacity", "backend_running", "backend_waiting", "dispatched", "instance", "role")
    RANK_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    BACKEND_RUNNING_FIELD_NUMBER: _ClassVar[int]
    BACKEND_WAITING_FIELD_NUMBER: _ClassVar[int]
    DISPATCHED_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    rank: int
    node: int
    healthy: bool
    in_flight: int
    capacity: int
    backend_running: int
    backend_waiting: int
    dispatched: int
    instance: str
    role: str
    def __init__(self, rank: _Optional[int] = ..., node: _Optional[int] = ..., healthy: _Optional[bool] = ..., in_flight: _Optional[int] = ..., capacity: _Optional[int] = ..., backend_running: _Optional[int] = ..., backend_waiting: _Optional[int] = ..., dispatched: _Optional[int] = ..., instance: _Optional[str] = ..., role: _Optional[str] = ...) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("ranks", "requests_ok", "requests_failed", "queued", "token_layers", "remote_hits", "inter_node_bytes", "inter_node_bytes_per_token", "estimated_inter_node_bytes", "prediction_hit_rate", "prediction_checks", "reroutes", "config_version", "uptime_seconds", "outcomes", "in_progress", "telemetry_sampled", "telemetry_accounted", "telemetry_dropped", "text_predictor", "text_predictor_reason")
    class OutcomesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    RANKS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_OK_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FAILED_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_LAYERS_FIELD_NUMBER: _ClassVar[int]
    REMOTE_HITS_FIELD_NUMBER: _ClassVar[int]
    INTER_NODE_BYTES_FIELD_NUMBER: _ClassVar[int]
    INTER_NODE_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_INTER_NODE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_CHECKS_FIELD_NUMBER: _ClassVar[int]
    REROUTES_FIELD_NUMBER: _ClassVar[int]
    CONFIG_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    IN_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_SAMPLED_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_ACCOUNTED_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_DROPPED_FIELD_NUMBER: _ClassVar[int]
    TEXT_PREDICTOR_FIELD_NUMBER: _ClassVar[int]
    TEXT_PREDICTOR_REASON_FIELD_NUMBER: _ClassVar[int]
    ranks: _containers.RepeatedCompositeFieldContainer[RankStats]
    requests_ok: int
    requests_failed: int
    queued: int
    token_layers: int
    remote_hits: int
    inter_node_bytes: float
    inter_node_bytes_per_token: float
    estimated_inter_node_bytes: float
    prediction_hit_rate: float
    prediction_checks: int
    reroutes: int
    config_version: str
    uptime_seconds: float
    outcomes: _containers.ScalarMap[str, int]
    in_progress: int
    telemetry_sampled: int
    telemetry_accounted: int
    telemetry_dropped: int
    text_predictor: str
    text_predictor_reason: str
    def __init__(self, ranks: _Optional[_Iterable[_Union[RankStats, _Mapping]]] = ..., requests_ok: _Optional[int] = ..., requests_failed: _Optional[int] = ..., queued: _Optional[int] = ..., token_layers: _Optional[int] = ..., remote_hits: _Optional[int] = ..., inter_node_bytes: _Optional[float] = ..., inter_node_bytes_per_token: _Optional[float] = ..., estimated_inter_node_bytes: _Optional[float] = ..., prediction_hit_rate: _Optional[float] = ..., prediction_checks: _Optional[int] = ..., reroutes: _Optional[int] = ..., config_version: _Optional[str] = ..., uptime_seconds: _Optional[float] = ..., outcomes: _Optional[_Mapping[str, int]] = ..., in_progress: _Optional[int] = ..., telemetry_sampled: _Optional[int] = ..., telemetry_accounted: _Optional[int] = ..., telemetry_dropped: _Optional[int] = ..., text_predictor: _Optional[str] = ..., text_predictor_reason: _Optional[str] = ...) -> None: ...

class GetFeedbackRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetFeedbackResponse(_message.Message):
    __slots__ = ("profile_json", "requests", "tokens", "placement_version")
    PROFILE_JSON_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    profile_json: str
    requests: int
    tokens: int
    placement_version: str
    def __init__(self, profile_json: _Optional[str] = ..., requests: _Optional[int] = ..., tokens: _Optional[int] = ..., placement_version: _Optional[str] = ...) -> None: ...

class ReloadConfigRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadConfigResponse(_message.Message):
    __slots__ = ("ok", "message", "config_version")
    OK_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_VERSION_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    message: str
    config_version: str
    def __init__(self, ok: _Optional[bool] = ..., message: _Optional[str] = ..., config_version: _Optional[str] = ...) -> None: ...
