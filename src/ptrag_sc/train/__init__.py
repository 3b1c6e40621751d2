"""Training plan of PT-RAG."""

from ._trainingplan import PTRAGTrainingPlan

__all__ = ["PTRAGTrainingPlan"]
