from google.protobuf import any_pb2 as _any_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_STATUS_UNSPECIFIED: _ClassVar[TaskStatus]
    TASK_STATUS_PENDING: _ClassVar[TaskStatus]
    TASK_STATUS_SEARCHING: _ClassVar[TaskStatus]
    TASK_STATUS_READY: _ClassVar[TaskStatus]
    TASK_STATUS_FAILED: _ClassVar[TaskStatus]
    TASK_STATUS_DAMAGED: _ClassVar[TaskStatus]

class OperationState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OPERATION_STATE_UNSPECIFIED: _ClassVar[OperationState]
    OPERATION_STATE_QUEUED: _ClassVar[OperationState]
    OPERATION_STATE_RUNNING: _ClassVar[OperationState]
    OPERATION_STATE_SUCCEEDED: _ClassVar[OperationState]
    OPERATION_STATE_FAILED: _ClassVar[OperationState]
    OPERATION_STATE_CANCELLED: _ClassVar[OperationState]
TASK_STATUS_UNSPECIFIED: TaskStatus
TASK_STATUS_PENDING: TaskStatus
TASK_STATUS_SEARCHING: TaskStatus
TASK_STATUS_READY: TaskStatus
TASK_STATUS_FAILED: TaskStatus
TASK_STATUS_DAMAGED: TaskStatus
OPERATION_STATE_UNSPECIFIED: OperationState
OPERATION_STATE_QUEUED: OperationState
OPERATION_STATE_RUNNING: OperationState
OPERATION_STATE_SUCCEEDED: OperationState
OPERATION_STATE_FAILED: OperationState
OPERATION_STATE_CANCELLED: OperationState

class TfdsSource(_message.Message):
    __slots__ = ("name", "data_dir", "train_split", "validation_split", "test_split", "image_key", "label_key")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATA_DIR_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SPLIT_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_SPLIT_FIELD_NUMBER: _ClassVar[int]
    TEST_SPLIT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_KEY_FIELD_NUMBER: _ClassVar[int]
    LABEL_KEY_FIELD_NUMBER: _ClassVar[int]
    name: str
    data_dir: str
    train_split: str
    validation_split: str
    test_split: str
    image_key: str
    label_key: str
    def __init__(self, name: _Optional[str] = ..., data_dir: _Optional[str] = ..., train_split: _Optional[str] = ..., validation_split: _Optional[str] = ..., test_split: _Optional[str] = ..., image_key: _Optional[str] = ..., label_key: _Optional[str] = ...) -> None: ...

class NpzSource(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class ImageFolderSource(_message.Message):
    __slots__ = ("path", "validation_fraction", "test_fraction")
    PATH_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FRACTION_FIELD_NUMBER: _ClassVar[int]
    TEST_FRACTION_FIELD_NUMBER: _ClassVar[int]
    path: str
    validation_fraction: float
    test_fraction: float
    def __init__(self, path: _Optional[str] = ..., validation_fraction: _Optional[float] = ..., test_fraction: _Optional[float] = ...) -> None: ...

class BundledSource(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class SearchBudget(_message.Message):
    __slots__ = ("generations", "candidates_per_generation", "train_rounds", "examples_per_round")
    GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_PER_GENERATION_FIELD_NUMBER: _ClassVar[int]
    TRAIN_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_PER_ROUND_FIELD_NUMBER: _ClassVar[int]
    generations: int
    candidates_per_generation: int
    train_rounds: int
    examples_per_round: int
    def __init__(self, generations: _Optional[int] = ..., candidates_per_generation: _Optional[int] = ..., train_rounds: _Optional[int] = ..., examples_per_round: _Optional[int] = ...) -> None: ...

class TaskSpec(_message.Message):
    __slots__ = ("name", "tfds", "npz", "image_folder", "bundled", "budget")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TFDS_FIELD_NUMBER: _ClassVar[int]
    NPZ_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FOLDER_FIELD_NUMBER: _ClassVar[int]
    BUNDLED_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    name: str
    tfds: TfdsSource
    npz: NpzSource
    image_folder: ImageFolderSource
    bundled: BundledSource
    budget: SearchBudget
    def __init__(self, name: _Optional[str] = ..., tfds: _Optional[_Union[TfdsSource, _Mapping]] = ..., npz: _Optional[_Union[NpzSource, _Mapping]] = ..., image_folder: _Optional[_Union[ImageFolderSource, _Mapping]] = ..., bundled: _Optional[_Union[BundledSource, _Mapping]] = ..., budget: _Optional[_Union[SearchBudget, _Mapping]] = ...) -> None: ...

class ComponentRef(_message.Message):
    __slots__ = ("name", "id", "locked_by", "params")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    LOCKED_BY_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    name: str
    id: str
    locked_by: _containers.RepeatedScalarFieldContainer[str]
    params: int
    def __init__(self, name: _Optional[str] = ..., id: _Optional[str] = ..., locked_by: _Optional[_Iterable[str]] = ..., params: _Optional[int] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("name", "status", "best_score", "validation_accuracy", "test_accuracy", "params", "accounted_params", "flops", "path_version", "components", "shares_with", "hparams", "num_classes", "spec", "probes", "status_message", "own_params", "path_params")
    class HparamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    BEST_SCORE_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    ACCOUNTED_PARAMS_FIELD_NUMBER: _ClassVar[int]
    FLOPS_FIELD_NUMBER: _ClassVar[int]
    PATH_VERSION_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    SHARES_WITH_FIELD_NUMBER: _ClassVar[int]
    HPARAMS_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    PROBES_FIELD_NUMBER: _ClassVar[int]
    STATUS_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OWN_PARAMS_FIELD_NUMBER: _ClassVar[int]
    PATH_PARAMS_FIELD_NUMBER: _ClassVar[int]
    name: str
    status: TaskStatus
    best_score: float
    validation_accuracy: float
    test_accuracy: float
    params: int
    accounted_params: float
    flops: float
    path_version: int
    components: _containers.RepeatedCompositeFieldContainer[ComponentRef]
    shares_with: _containers.RepeatedScalarFieldContainer[str]
    hparams: _containers.ScalarMap[str, str]
    num_classes: int
    spec: TaskSpec
    probes: _containers.RepeatedCompositeFieldContainer[ParentProbe]
    status_message: str
    own_params: int
    path_params: int
    def __init__(self, name: _Optional[str] = ..., status: _Optional[_Union[TaskStatus, str]] = ..., best_score: _Optional[float] = ..., validation_accuracy: _Optional[float] = ..., test_accuracy: _Optional[float] = ..., params: _Optional[int] = ..., accounted_params: _Optional[float] = ..., flops: _Optional[float] = ..., path_version: _Optional[int] = ..., components: _Optional[_Iterable[_Union[ComponentRef, _Mapping]]] = ..., shares_with: _Optional[_Iterable[str]] = ..., hparams: _Optional[_Mapping[str, str]] = ..., num_classes: _Optional[int] = ..., spec: _Optional[_Union[TaskSpec, _Mapping]] = ..., probes: _Optional[_Iterable[_Union[ParentProbe, _Mapping]]] = ..., status_message: _Optional[str] = ..., own_params: _Optional[int] = ..., path_params: _Optional[int] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteTaskRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteTaskResponse(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListTasksRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListTasksResponse(_message.Message):
    __slots__ = ("tasks", "next_page_token")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[Task]
    next_page_token: str
    def __init__(self, tasks: _Optional[_Iterable[_Union[Task, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class OperationMetadata(_message.Message):
    __slots__ = ("kind", "task", "state", "generation", "generations", "candidates_scored", "best_score", "best_quality", "create_time", "update_time", "plan", "current_task", "tasks")
    KIND_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_SCORED_FIELD_NUMBER: _ClassVar[int]
    BEST_SCORE_FIELD_NUMBER: _ClassVar[int]
    BEST_QUALITY_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    CURRENT_TASK_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    task: str
    state: OperationState
    generation: int
    generations: int
    candidates_scored: int
    best_score: float
    best_quality: float
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    plan: SearchPlan
    current_task: str
    tasks: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, kind: _Optional[str] = ..., task: _Optional[str] = ..., state: _Optional[_Union[OperationState, str]] = ..., generation: _Optional[int] = ..., generations: _Optional[int] = ..., candidates_scored: _Optional[int] = ..., best_score: _Optional[float] = ..., best_quality: _Optional[float] = ..., create_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., plan: _Optional[_Union[SearchPlan, _Mapping]] = ..., current_task: _Optional[str] = ..., tasks: _Optional[_Iterable[str]] = ...) -> None: ...

class SearchPlan(_message.Message):
    __slots__ = ("generations", "candidates_per_generation", "rounds", "examples_per_round", "batch_size", "steps_per_candidate", "train_examples", "validation_examples", "description", "first_generation_candidates", "halving_round")
    GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_PER_GENERATION_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_PER_ROUND_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    TRAIN_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    FIRST_GENERATION_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    HALVING_ROUND_FIELD_NUMBER: _ClassVar[int]
    generations: int
    candidates_per_generation: int
    rounds: int
    examples_per_round: int
    batch_size: int
    steps_per_candidate: int
    train_examples: int
    validation_examples: int
    description: str
    first_generation_candidates: int
    halving_round: int
    def __init__(self, generations: _Optional[int] = ..., candidates_per_generation: _Optional[int] = ..., rounds: _Optional[int] = ..., examples_per_round: _Optional[int] = ..., batch_size: _Optional[int] = ..., steps_per_candidate: _Optional[int] = ..., train_examples: _Optional[int] = ..., validation_examples: _Optional[int] = ..., description: _Optional[str] = ..., first_generation_candidates: _Optional[int] = ..., halving_round: _Optional[int] = ...) -> None: ...

class ParentProbe(_message.Message):
    __slots__ = ("path_id", "task", "accuracy", "seconds", "chosen", "reason")
    PATH_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    path_id: str
    task: str
    accuracy: float
    seconds: float
    chosen: int
    reason: str
    def __init__(self, path_id: _Optional[str] = ..., task: _Optional[str] = ..., accuracy: _Optional[float] = ..., seconds: _Optional[float] = ..., chosen: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class OperationError(_message.Message):
    __slots__ = ("code", "message", "details")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    details: _containers.RepeatedCompositeFieldContainer[_any_pb2.Any]
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., details: _Optional[_Iterable[_Union[_any_pb2.Any, _Mapping]]] = ...) -> None: ...

class TaskResult(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: Task
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ...) -> None: ...

class Operation(_message.Message):
    __slots__ = ("name", "metadata", "done", "error", "response")
    NAME_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    name: str
    metadata: OperationMetadata
    done: bool
    error: OperationError
    response: TaskResult
    def __init__(self, name: _Optional[str] = ..., metadata: _Optional[_Union[OperationMetadata, _Mapping]] = ..., done: bool = ..., error: _Optional[_Union[OperationError, _Mapping]] = ..., response: _Optional[_Union[TaskResult, _Mapping]] = ...) -> None: ...

class SubmitTaskRequest(_message.Message):
    __slots__ = ("spec", "request_id")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    spec: TaskSpec
    request_id: str
    def __init__(self, spec: _Optional[_Union[TaskSpec, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class ImproveRequest(_message.Message):
    __slots__ = ("task", "request_id")
    TASK_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    task: str
    request_id: str
    def __init__(self, task: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class GetOperationRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListOperationsRequest(_message.Message):
    __slots__ = ("task", "page_size", "page_token", "filter")
    TASK_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    task: str
    page_size: int
    page_token: str
    filter: str
    def __init__(self, task: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., filter: _Optional[str] = ...) -> None: ...

class ListOperationsResponse(_message.Message):
    __slots__ = ("operations", "next_page_token")
    OPERATIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    operations: _containers.RepeatedCompositeFieldContainer[Operation]
    next_page_token: str
    def __init__(self, operations: _Optional[_Iterable[_Union[Operation, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelOperationRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class WaitOperationRequest(_message.Message):
    __slots__ = ("name", "timeout_seconds", "timeout")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    name: str
    timeout_seconds: float
    timeout: _duration_pb2.Duration
    def __init__(self, name: _Optional[str] = ..., timeout_seconds: _Optional[float] = ..., timeout: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class DeleteOperationRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteOperationResponse(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class WatchEvolutionRequest(_message.Message):
    __slots__ = ("task", "after_sequence")
    TASK_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    task: str
    after_sequence: int
    def __init__(self, task: _Optional[str] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class SearchStarted(_message.Message):
    __slots__ = ("kind", "plan", "probes")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    PROBES_FIELD_NUMBER: _ClassVar[int]
    kind: str
    plan: SearchPlan
    probes: _containers.RepeatedCompositeFieldContainer[ParentProbe]
    def __init__(self, kind: _Optional[str] = ..., plan: _Optional[_Union[SearchPlan, _Mapping]] = ..., probes: _Optional[_Iterable[_Union[ParentProbe, _Mapping]]] = ...) -> None: ...

class GenerationStarted(_message.Message):
    __slots__ = ("generation", "generations", "candidates")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    generation: int
    generations: int
    candidates: int
    def __init__(self, generation: _Optional[int] = ..., generations: _Optional[int] = ..., candidates: _Optional[int] = ...) -> None: ...

class CandidateScored(_message.Message):
    __slots__ = ("path_id", "parent_id", "parent_task", "generation", "score", "quality", "params", "flops", "mutations", "accepted_into_population", "train_seconds", "compile_seconds", "learned_mu")
    class LearnedMuEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PATH_ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_TASK_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    FLOPS_FIELD_NUMBER: _ClassVar[int]
    MUTATIONS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_INTO_POPULATION_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMPILE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LEARNED_MU_FIELD_NUMBER: _ClassVar[int]
    path_id: str
    parent_id: str
    parent_task: str
    generation: int
    score: float
    quality: float
    params: float
    flops: float
    mutations: _containers.RepeatedScalarFieldContainer[str]
    accepted_into_population: bool
    train_seconds: float
    compile_seconds: float
    learned_mu: _containers.ScalarMap[str, float]
    def __init__(self, path_id: _Optional[str] = ..., parent_id: _Optional[str] = ..., parent_task: _Optional[str] = ..., generation: _Optional[int] = ..., score: _Optional[float] = ..., quality: _Optional[float] = ..., params: _Optional[float] = ..., flops: _Optional[float] = ..., mutations: _Optional[_Iterable[str]] = ..., accepted_into_population: bool = ..., train_seconds: _Optional[float] = ..., compile_seconds: _Optional[float] = ..., learned_mu: _Optional[_Mapping[str, float]] = ...) -> None: ...

class CandidateAccepted(_message.Message):
    __slots__ = ("path_id", "score", "quality")
    PATH_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    path_id: str
    score: float
    quality: float
    def __init__(self, path_id: _Optional[str] = ..., score: _Optional[float] = ..., quality: _Optional[float] = ...) -> None: ...

class SearchFinished(_message.Message):
    __slots__ = ("path_id", "score", "quality", "test_accuracy", "state", "message")
    PATH_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    path_id: str
    score: float
    quality: float
    test_accuracy: float
    state: str
    message: str
    def __init__(self, path_id: _Optional[str] = ..., score: _Optional[float] = ..., quality: _Optional[float] = ..., test_accuracy: _Optional[float] = ..., state: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class CheckpointWritten(_message.Message):
    __slots__ = ("step", "directory", "new_components")
    STEP_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    NEW_COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    step: int
    directory: str
    new_components: int
    def __init__(self, step: _Optional[int] = ..., directory: _Optional[str] = ..., new_components: _Optional[int] = ...) -> None: ...

class TrainingProgress(_message.Message):
    __slots__ = ("generation", "generations", "candidates", "step", "steps", "examples_per_second")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    generation: int
    generations: int
    candidates: int
    step: int
    steps: int
    examples_per_second: float
    def __init__(self, generation: _Optional[int] = ..., generations: _Optional[int] = ..., candidates: _Optional[int] = ..., step: _Optional[int] = ..., steps: _Optional[int] = ..., examples_per_second: _Optional[float] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("sequence", "time", "task", "operation", "generation_started", "candidate_scored", "candidate_accepted", "search_finished", "checkpoint_written", "search_started", "training_progress")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    GENERATION_STARTED_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_SCORED_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    SEARCH_FINISHED_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    SEARCH_STARTED_FIELD_NUMBER: _ClassVar[int]
    TRAINING_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    time: _timestamp_pb2.Timestamp
    task: str
    operation: str
    generation_started: GenerationStarted
    candidate_scored: CandidateScored
    candidate_accepted: CandidateAccepted
    search_finished: SearchFinished
    checkpoint_written: CheckpointWritten
    search_started: SearchStarted
    training_progress: TrainingProgress
    def __init__(self, sequence: _Optional[int] = ..., time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., task: _Optional[str] = ..., operation: _Optional[str] = ..., generation_started: _Optional[_Union[GenerationStarted, _Mapping]] = ..., candidate_scored: _Optional[_Union[CandidateScored, _Mapping]] = ..., candidate_accepted: _Optional[_Union[CandidateAccepted, _Mapping]] = ..., search_finished: _Optional[_Union[SearchFinished, _Mapping]] = ..., checkpoint_written: _Optional[_Union[CheckpointWritten, _Mapping]] = ..., search_started: _Optional[_Union[SearchStarted, _Mapping]] = ..., training_progress: _Optional[_Union[TrainingProgress, _Mapping]] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("shape", "datatype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATATYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    datatype: str
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., datatype: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class EncodedImages(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, images: _Optional[_Iterable[bytes]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("task", "array", "encoded")
    TASK_FIELD_NUMBER: _ClassVar[int]
    ARRAY_FIELD_NUMBER: _ClassVar[int]
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    task: str
    array: Tensor
    encoded: EncodedImages
    def __init__(self, task: _Optional[str] = ..., array: _Optional[_Union[Tensor, _Mapping]] = ..., encoded: _Optional[_Union[EncodedImages, _Mapping]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("task", "path_version", "classes", "probabilities", "class_names")
    TASK_FIELD_NUMBER: _ClassVar[int]
    PATH_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    task: str
    path_version: int
    classes: _containers.RepeatedScalarFieldContainer[int]
    probabilities: Tensor
    class_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, task: _Optional[str] = ..., path_version: _Optional[int] = ..., classes: _Optional[_Iterable[int]] = ..., probabilities: _Optional[_Union[Tensor, _Mapping]] = ..., class_names: _Optional[_Iterable[str]] = ...) -> None: ...

class GetSystemRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SharingEdge(_message.Message):
    __slots__ = ("task_a", "task_b", "shared_components")
    TASK_A_FIELD_NUMBER: _ClassVar[int]
    TASK_B_FIELD_NUMBER: _ClassVar[int]
    SHARED_COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    task_a: str
    task_b: str
    shared_components: int
    def __init__(self, task_a: _Optional[str] = ..., task_b: _Optional[str] = ..., shared_components: _Optional[int] = ...) -> None: ...

class SystemSummary(_message.Message):
    __slots__ = ("num_tasks", "num_components", "total_params", "params_per_task", "edges", "dot", "checkpoint_step", "root_model", "config_name", "damaged_tasks")
    class ParamsPerTaskEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NUM_TASKS_FIELD_NUMBER: _ClassVar[int]
    NUM_COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_PARAMS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_PER_TASK_FIELD_NUMBER: _ClassVar[int]
    EDGES_FIELD_NUMBER: _ClassVar[int]
    DOT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    ROOT_MODEL_FIELD_NUMBER: _ClassVar[int]
    CONFIG_NAME_FIELD_NUMBER: _ClassVar[int]
    DAMAGED_TASKS_FIELD_NUMBER: _ClassVar[int]
    num_tasks: int
    num_components: int
    total_params: int
    params_per_task: _containers.ScalarMap[str, float]
    edges: _containers.RepeatedCompositeFieldContainer[SharingEdge]
    dot: str
    checkpoint_step: int
    root_model: str
    config_name: str
    damaged_tasks: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, num_tasks: _Optional[int] = ..., num_components: _Optional[int] = ..., total_params: _Optional[int] = ..., params_per_task: _Optional[_Mapping[str, float]] = ..., edges: _Optional[_Iterable[_Union[SharingEdge, _Mapping]]] = ..., dot: _Optional[str] = ..., checkpoint_step: _Optional[int] = ..., root_model: _Optional[str] = ..., config_name: _Optional[str] = ..., damaged_tasks: _Optional[_Iterable[str]] = ...) -> None: ...
