"""The rank analysis behind FedLoRU, as maths on a model and data.

* :func:`stable_rank` (with :func:`model_hessian`): the Hessian's stable rank ||H||_F^2 /
  ||H||_2^2 by Lanczos and Hutchinson on autograd Hessian-vector products, for any task's loss;
* :func:`gradient_similarity`: clients' gradients, full vs rank-r, by mean pairwise cosine similarity.

``rankfed analyze`` (:mod:`rankfed.app.analyze`) runs them along a run folder's checkpoints.
"""

from .hessian import HessianOperator, StableRank, hutchinson_frobenius_sq, lanczos_extremes, model_hessian, stable_rank
from .similarity import GradientSimilarity, client_gradient, gradient_similarity, low_rank, mean_pairwise_cosine

__all__ = [
    "HessianOperator",
    "StableRank",
    "stable_rank",
    "model_hessian",
    "lanczos_extremes",
    "hutchinson_frobenius_sq",
    "GradientSimilarity",
    "gradient_similarity",
    "client_gradient",
    "low_rank",
    "mean_pairwise_cosine",
]
