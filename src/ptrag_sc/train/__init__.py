"""Training plan and callbacks of PT-RAG."""

from ._callbacks import KeepBestWeights
from ._trainingplan import PTRAGTrainingPlan

__all__ = ["KeepBestWeights", "PTRAGTrainingPlan"]
