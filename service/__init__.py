"""The runtime of one ndo worker: NATS ingress, activations, turns, group commit, shutdown."""

from service._config import WorkerConfig
from service._metrics import WorkerMetrics
from service._worker import QUEUE_GROUP, Worker, WorkerState, WorkerStats

__all__ = ["QUEUE_GROUP", "Worker", "WorkerConfig", "WorkerMetrics", "WorkerState", "WorkerStats"]
