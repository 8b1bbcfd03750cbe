"""rankfed: communication-efficient federated and data-parallel training by low-rank updates.

Bring your own PyTorch model, per-client data and loss::

    import rankfed as rf
    fed = rf.Federation(model=MyNet, clients=client_datasets, test=test_dataset,
                        algorithm=rf.FedLoRU(rank=8, tau=10),
                        local=rf.LocalTraining(optimizer=torch.optim.Adam, lr=1e-3, epochs=1, batch_size=32),
                        loss=my_loss, metrics={"f1": my_f1}, seed=0)
    result = fed.run(rounds=100, clients_per_round=10, out="runs/x")
    result.history; result.model; result.bytes

Algorithms (one class each, their fields the options): :class:`FedAvg`, :class:`MAPA`,
:class:`FALoRA`, :class:`FedLoRA`, :class:`FedLoRU`, :class:`FedHM`, :class:`PFedLoRU`,
:class:`PFedLoRA`, :class:`MFedLoRU`. Uplink compressors: :mod:`rankfed.compress`
(``rf.FedAvg(compressor=rf.compress.chain(rf.compress.topk(0.01), rf.compress.qsgd(8)))``).
:func:`compare` runs one federation under several algorithms; :mod:`rankfed.flower` runs it
on a Flower deployment; :mod:`rankfed.ddp` holds the data-parallel compression hooks.
"""

from rankfed import compress, tracking
from rankfed._version import __version__
from rankfed.algorithms import FALoRA, MAPA, Algorithm, FedAvg, FedHM, FedLoRA, FedLoRU, MFedLoRU, PFedLoRA, PFedLoRU
from rankfed.errors import ConfigError, Diverged
from rankfed.federation import Comparison, Federation, Result, compare, compare_runs
from rankfed.local import ClientData, LocalTraining, Task, TrainStats
from rankfed.lowrank.peft_lora import save_peft
from rankfed.protocol import ClientContext

__all__ = [
    "__version__",
    "Federation",
    "Result",
    "compare",
    "compare_runs",
    "tracking",
    "Comparison",
    "LocalTraining",
    "Task",
    "ClientData",
    "ClientContext",
    "TrainStats",
    "Algorithm",
    "FedAvg",
    "MAPA",
    "FALoRA",
    "FedLoRA",
    "FedLoRU",
    "FedHM",
    "PFedLoRU",
    "PFedLoRA",
    "MFedLoRU",
    "save_peft",
    "compress",
    "ConfigError",
    "Diverged",
]
