"""Training plan and callbacks of PT-RAG."""

from ._callbacks import KeepBestWeights
from ._trainingplan import NonFiniteLossError, PTRAGTrainingPlan

__all__ = ["KeepBestWeights", "NonFiniteLossError", "PTRAGTrainingPlan"]
