"""Local training: what one client (or one data-parallel worker) does with its data.

* :class:`LocalTraining` - the client's optimiser, lr, epochs, batch size (the ``[client]`` table);
* :class:`Task` - the loss and metrics (the loss is a parameter everywhere; cross-entropy by default);
* :class:`ClientData` - a client's samples, in memory or streamed from a Dataset;
* :class:`LocalTrainer` - the loop; :class:`CohortTrainer` - a round's clients as one
  ``torch.func.vmap`` computation.
"""

from rankfed.local.cohort import CohortOutOfMemory, CohortTrainer, cohort_supported, has_dropout
from rankfed.local.data import ClientData, as_client_data
from rankfed.local.loop import LocalTrainer, TrainStats
from rankfed.local.task import Task, call_model, class_dim, cross_entropy, logits_of
from rankfed.local.training import OPTIMIZERS, LocalTraining

__all__ = [
    "LocalTraining",
    "OPTIMIZERS",
    "Task",
    "cross_entropy",
    "logits_of",
    "class_dim",
    "call_model",
    "ClientData",
    "as_client_data",
    "LocalTrainer",
    "TrainStats",
    "CohortTrainer",
    "CohortOutOfMemory",
    "cohort_supported",
    "has_dropout",
]
