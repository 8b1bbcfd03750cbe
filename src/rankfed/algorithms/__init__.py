"""Federated algorithms: one class per algorithm, its fields the options (see :mod:`.base`).

=============  =============  ===================================================
class          file name      what travels up
=============  =============  ===================================================
``FedAvg``     ``fedavg``     the update of the trainable tensors (or compressed)
``MAPA``       ``mapa``       k numbers (B); A is rebuilt from the round's seed
``FALoRA``     ``fa_lora``    the ``up`` factors (``down`` frozen at random)
``FedLoRA``    ``fedlora``    both factors of every factorised layer
``FedLoRU``    ``fedloru``    as FedLoRA, merged into the base every tau rounds
``PFedLoRU``   ``pfedloru``   as FedLoRU; personal factors stay on the client
``PFedLoRA``   ``pfedlora``   the model's update; personal factors stay
``MFedLoRU``   ``mfedloru``   nested factors of each client tier's ranks
``FedHM``      ``fedhm``      SVD factors the server hands out, trained
=============  =============  ===================================================
"""

from rankfed.algorithms.base import ALGORITHMS, Algorithm, get_algorithm, register
from rankfed.algorithms.fedavg import FedAvg
from rankfed.algorithms.fedhm import FedHM
from rankfed.algorithms.hetero import MFedLoRU
from rankfed.algorithms.lora import FALoRA, FedLoRA, FedLoRU
from rankfed.algorithms.mapa import MAPA
from rankfed.algorithms.personal import PFedLoRA, PFedLoRU

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "register",
    "get_algorithm",
    "FedAvg",
    "MAPA",
    "FALoRA",
    "FedLoRA",
    "FedLoRU",
    "FedHM",
    "PFedLoRU",
    "PFedLoRA",
    "MFedLoRU",
]
