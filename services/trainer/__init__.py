"""The trainer agent's core: host models that grow seeds while they train.

Pure modules (no network); the servicer wires them to gRPC. See
`services/trainer/README.md` for the design and the decisions behind it.

- `spec`: the typed job spec (mirrors `graftmesh.v1.JobSpec`);
- `models`: host templates (`mlp`, `cnn`, `resnet`, `transformer`) and user factories;
- `lifecycle`: the seed state machine and blend schedules;
- `seeds`: `SeedSlot`, the module that grows a seed at a host site;
- `surgery`: checked insert/remove/graft/cull, undone on failure;
- `data`, `sampler`: data sets and the resumable sampler;
- `checkpoint`, `state`: atomic, checksummed, pickle-free checkpoints;
- `plugins`, `safety`, `loop`: the training loop and its guards;
- `growth`: the growth policy and its two boundaries (selector, kernel source);
- `hardware`, `export`, `events`.
"""

from services.trainer.checkpoint import CheckpointData, CheckpointInfo, CheckpointStore
from services.trainer.data import DATASETS, DataBundle, Split, load_data
from services.trainer.events import (
    CheckpointSaved,
    EventSink,
    GrowthStatus,
    SafetyEvent,
    SlotTransition,
    TrainingEvent,
    TrainingProgress,
)
from services.trainer.export import ExportedModel, export_model, reference_statistics
from services.trainer.growth import (
    FAILURE_REWARD,
    ArmCandidate,
    BlueprintOption,
    GrowthController,
    GrowthHost,
    KernelArtifact,
    KernelLoader,
    KernelSource,
    PlateauDetector,
    SeedSelectorClient,
    Selection,
    SelectionRequest,
    seed_reward,
)
from services.trainer.hardware import (
    GpuInfo,
    HardwareInfo,
    MemoryProfile,
    batch_size_for_budget,
    choose_device,
    detect_hardware,
    measure_memory,
)
from services.trainer.lifecycle import (
    ACTIVE_STATES,
    TRANSITIONS,
    BlendSchedule,
    LifecycleError,
    LifecycleTimings,
    SeedState,
    automatic_transition,
    blend_alpha,
    check_transition,
)
from services.trainer.loop import Trainer, TrainingResult
from services.trainer.models import TEMPLATES, DataShape, build_model, slot_sites
from services.trainer.plugins import (
    CALLBACKS,
    LOSSES,
    OPTIMIZERS,
    SCHEDULES,
    Callback,
    CallbackContext,
    EarlyStopping,
    Registry,
)
from services.trainer.safety import GradientGuard, SpikeDetector, TrainingAborted
from services.trainer.sampler import EpochSampler
from services.trainer.seeds import SeedSlot, SlotRecord, SlotShape
from services.trainer.spec import (
    DataSpec,
    GrowthSpec,
    JobSpec,
    LossSpec,
    ModelSpec,
    OptimizerSpec,
    PluginRef,
    SafetySpec,
    SchedulerSpec,
    SlotConfig,
    parse_job_spec,
)
from services.trainer.surgery import (
    SurgeryError,
    cull,
    find_slots,
    graft,
    insert_slot,
    remove_slot,
)

__all__ = [
    "ACTIVE_STATES",
    "CALLBACKS",
    "DATASETS",
    "FAILURE_REWARD",
    "LOSSES",
    "OPTIMIZERS",
    "SCHEDULES",
    "TEMPLATES",
    "TRANSITIONS",
    "ArmCandidate",
    "BlendSchedule",
    "BlueprintOption",
    "Callback",
    "CallbackContext",
    "CheckpointData",
    "CheckpointInfo",
    "CheckpointSaved",
    "CheckpointStore",
    "DataBundle",
    "DataShape",
    "DataSpec",
    "EarlyStopping",
    "EpochSampler",
    "EventSink",
    "ExportedModel",
    "GpuInfo",
    "GradientGuard",
    "GrowthController",
    "GrowthHost",
    "GrowthSpec",
    "GrowthStatus",
    "HardwareInfo",
    "JobSpec",
    "KernelArtifact",
    "KernelLoader",
    "KernelSource",
    "LifecycleError",
    "LifecycleTimings",
    "LossSpec",
    "MemoryProfile",
    "ModelSpec",
    "OptimizerSpec",
    "PlateauDetector",
    "PluginRef",
    "Registry",
    "SafetyEvent",
    "SafetySpec",
    "SchedulerSpec",
    "SeedSelectorClient",
    "SeedSlot",
    "SeedState",
    "Selection",
    "SelectionRequest",
    "SlotConfig",
    "SlotRecord",
    "SlotShape",
    "SlotTransition",
    "SpikeDetector",
    "Split",
    "SurgeryError",
    "Trainer",
    "TrainingAborted",
    "TrainingEvent",
    "TrainingProgress",
    "TrainingResult",
    "automatic_transition",
    "batch_size_for_budget",
    "blend_alpha",
    "build_model",
    "check_transition",
    "choose_device",
    "cull",
    "detect_hardware",
    "export_model",
    "find_slots",
    "graft",
    "insert_slot",
    "load_data",
    "measure_memory",
    "parse_job_spec",
    "reference_statistics",
    "remove_slot",
    "seed_reward",
    "slot_sites",
]
