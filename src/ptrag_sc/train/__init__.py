"""Training plan, callbacks and how a model drives Lightning (`_runner`)."""

from ._callbacks import KeepBestWeights, TrainingProgress, training_summary
from ._trainingplan import NonFiniteLossError, PTRAGTrainingPlan

__all__ = [
    "KeepBestWeights",
    "NonFiniteLossError",
    "PTRAGTrainingPlan",
    "TrainingProgress",
    "training_summary",
]
