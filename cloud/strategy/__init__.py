"""cloud.strategy: the federated algorithms shared by the networked aggregator and the simulator.

FedPav with CDW weights and BatchNorm policies as a streaming fold over flat buffers (`aggregate`),
robust options, the admission caps on what one site can weigh (`caps`), and server-side knowledge
distillation (`kd`).
"""

from cloud.strategy.aggregate import (
    NoUpdatesError,
    Rejection,
    RoundAggregate,
    StrategyConfig,
    StreamingAggregator,
    Update,
    bn_policy_keys,
    raw_weight,
    weighted_average,
)
from cloud.strategy.caps import AdmissionConfig
from cloud.strategy.flat import FlatLayout, LayoutError
from cloud.strategy.kd import (
    KDConfig,
    KDDiverged,
    KDResult,
    TeacherMean,
    distill,
    embed_public,
    kd_summary,
    kd_target,
)

__all__ = [
    "AdmissionConfig",
    "FlatLayout",
    "KDConfig",
    "KDDiverged",
    "KDResult",
    "LayoutError",
    "NoUpdatesError",
    "Rejection",
    "RoundAggregate",
    "StrategyConfig",
    "StreamingAggregator",
    "TeacherMean",
    "Update",
    "bn_policy_keys",
    "distill",
    "embed_public",
    "kd_summary",
    "kd_target",
    "raw_weight",
    "weighted_average",
]
