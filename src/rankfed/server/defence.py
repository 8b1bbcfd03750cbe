"""What keeps one client from taking over the model: trusted weights, bounded uploads, robust
aggregation and differential privacy, on the transport-neutral round.

Every transport (the simulator, a Flower deployment, Flower's simulation engine) folds its
uploads through :class:`~rankfed.server.validate.RoundFold`; with :class:`Defences` set, each
upload that passed the checks goes through an :class:`UploadGuard` before it is folded in:

1. **Its weight.** ``sample_weights = "claimed"`` (the upload's ``@num_samples``, the default),
   ``"recorded"`` (at most the server's own record of the client's data size, where the
   transport has one) or ``"uniform"`` (every upload weighs 1); then at most
   ``max_sample_weight`` (0: no cap). Uploads whose weight was cut are counted.
2. **Its size.** With ``clip_norm`` > 0 the tensors the server averages (the update, MAPA's
   ``B``, the LoRA factors' updates: what :meth:`~rankfed.protocol.ServerHalf.fold` returns,
   taken as one vector, relative to :meth:`~rankfed.protocol.ServerHalf.fold_reference` for a
   server half that averages models) are scaled down to L2 norm at most the bound. With
   ``clip_quantile`` > 0 the bound is adaptive: that quantile of the norms of the accepted
   uploads of the last ``clip_window`` rounds (``clip_norm`` before there are any; no clipping
   if it is 0). Clipped uploads are counted.
3. **The aggregate.** ``aggregator = "mean"`` (the weighted mean, streamed, O(model)),
   ``"median"`` / ``"trimmed_mean"`` (coordinate-wise, unweighted, ``trim_beta``) or
   ``"krum"`` (``krum_malicious`` = f, ``krum_keep`` = m for multi-Krum), from
   :mod:`rankfed.algorithms.aggregate`. The robust ones keep the round's uploads (after
   steps 1-2) until it closes: O(clients x upload) of memory, small for the low-rank payloads.
   Every algorithm's server half averages what ``fold`` returns, so each aggregator applies to
   all of it: FedAvg's update, MAPA's ``B`` (and buffer updates), the LoRA family's factor
   updates; FedLoRU's merges and FedHM's recovery act on the robust aggregate afterwards.
4. **Differential privacy.** ``dp = "central"``: each upload clipped to ``clip_norm`` C,
   weights uniform, Gaussian noise N(0, (sigma C)^2) added to the sum of the round's uploads
   by the server (the mean is (sum + noise) / n). ``dp = "local"``: each client clips its own
   uplink to C and adds the noise itself (:class:`LocalNoise`), the server sees only noisy
   uploads. ``dp_noise`` is sigma, or ``dp_epsilon`` > 0 asks for the sigma that spends that
   epsilon by the last round. The privacy spent is reported every round as epsilon at
   ``dp_delta``, from Opacus's RDP accountant (``pip install 'rankfed[dp]'``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from rankfed.algorithms.aggregate import AGGREGATORS, coordinate_median, krum, krum_select, trimmed_mean
from rankfed.checks import bad, choice
from rankfed.protocol import ClientContext, ClientHalf, RoundSums, derive_seed
from rankfed.wire import Payload

__all__ = ["Defences", "DP_MODES", "SAMPLE_WEIGHTS", "UploadGuard", "DefendedSums", "LocalNoise", "PrivacyLedger", "resolve_noise", "uplink_norm", "private_client", "check_local_noise"]

DP_MODES = ("", "central", "local")
SAMPLE_WEIGHTS = ("claimed", "recorded", "uniform")
_NOISE_TAG = 0xD1FF  # seeds of the noise (server: per round and entry; client: per client and round)


@dataclass
class Defences:
    """The ``[federation]`` keys of the defences (see the module), all off by default; the base
    of :class:`~rankfed.server.RunOptions`. Treat as read-only (``dataclasses.replace``)."""

    aggregator: str = "mean"
    trim_beta: float = 0.1
    krum_malicious: int = 0
    krum_keep: int = 1
    sample_weights: str = "claimed"
    max_sample_weight: int = 0
    clip_norm: float = 0.0
    clip_quantile: float = 0.0
    clip_window: int = 5
    dp: str = ""
    dp_noise: float = 0.0
    dp_epsilon: float = 0.0
    dp_delta: float = 1e-5

    def __post_init__(self) -> None:
        choice("federation.aggregator", self.aggregator, AGGREGATORS)
        choice("federation.sample_weights", self.sample_weights, SAMPLE_WEIGHTS)
        choice("federation.dp", self.dp, DP_MODES)
        if not 0.0 <= self.trim_beta < 0.5:
            raise bad("federation.trim_beta", self.trim_beta, "must be in [0, 0.5) (the fraction of values cut at each end)")
        if self.krum_malicious < 0:
            raise bad("federation.krum_malicious", self.krum_malicious, "must be >= 0 (the malicious clients Krum tolerates)")
        if self.krum_keep < 1:
            raise bad("federation.krum_keep", self.krum_keep, "must be >= 1 (1: Krum, m > 1: multi-Krum averaging the m best)")
        if self.max_sample_weight < 0:
            raise bad("federation.max_sample_weight", self.max_sample_weight, "must be >= 0 (0 = no cap)")
        if not (math.isfinite(self.clip_norm) and self.clip_norm >= 0):
            raise bad("federation.clip_norm", self.clip_norm, "must be a finite number >= 0 (0 = no clipping)")
        if not 0.0 <= self.clip_quantile < 1.0:
            raise bad("federation.clip_quantile", self.clip_quantile, "must be in [0, 1) (0 = a fixed bound)")
        if self.clip_window < 1:
            raise bad("federation.clip_window", self.clip_window, "must be >= 1 (rounds of norms the adaptive bound is drawn from)")
        if not (math.isfinite(self.dp_noise) and self.dp_noise >= 0):
            raise bad("federation.dp_noise", self.dp_noise, "must be a finite number >= 0 (the noise multiplier sigma)")
        if not (math.isfinite(self.dp_epsilon) and self.dp_epsilon >= 0):
            raise bad("federation.dp_epsilon", self.dp_epsilon, "must be a finite number >= 0 (0: use dp_noise)")
        if not 0.0 < self.dp_delta < 1.0:
            raise bad("federation.dp_delta", self.dp_delta, "must be in (0, 1)")
        if self.dp:
            if self.clip_norm <= 0:
                raise bad("federation.clip_norm", self.clip_norm, f"dp = {self.dp!r} needs a bound > 0 (the sensitivity the noise is scaled to)")
            if self.clip_quantile:
                raise bad("federation.clip_quantile", self.clip_quantile, "differential privacy needs a fixed bound (an adaptive one learnt from the uploads leaks them): set it to 0")
            if self.aggregator != "mean" and self.dp == "central":  # (local DP survives any aggregation: post-processing)
                raise bad("federation.aggregator", self.aggregator, "central DP adds noise to the mean (the sum's sensitivity is the bound): use 'mean'")
            if not self.dp_noise and not self.dp_epsilon:
                raise bad("federation.dp_noise", self.dp_noise, "dp needs dp_noise > 0 (the noise multiplier) or dp_epsilon > 0 (a target)")
            if self.dp_noise and self.dp_epsilon:
                raise bad("federation.dp_epsilon", self.dp_epsilon, f"give dp_noise ({self.dp_noise}) or dp_epsilon, not both")
        elif self.dp_noise or self.dp_epsilon:
            raise bad("federation.dp", self.dp, "dp_noise / dp_epsilon are set but dp is off: set dp = 'central' or 'local'")

    @classmethod
    def from_options(cls, options) -> Defences:
        """The defences of a :class:`~rankfed.server.RunOptions` (its fields of the same names)."""
        return cls(**{f.name: getattr(options, f.name) for f in dataclasses.fields(cls)})  # (a RunOptions' own, not a subclass)

    @property
    def active(self) -> bool:
        """Whether the server does anything beyond the plain weighted mean of claimed counts."""
        return self != Defences()

    @property
    def server_clip(self) -> bool:
        """Whether the server clips uploads (not with local DP: the clients clipped before noising)."""
        return (self.clip_norm > 0 or self.clip_quantile > 0) and self.dp != "local"


def resolve_noise(defences: Defences, rounds: int, sample_rate: float) -> Defences:
    """``defences`` with ``dp_noise`` set: as given, or for ``dp_epsilon`` the sigma Opacus finds
    for that epsilon at ``dp_delta`` after ``rounds`` rounds (central: clients sampled at
    ``sample_rate``; local: a client that takes part in every round)."""
    if not defences.dp or defences.dp_noise:
        return defences
    from opacus.accountants.utils import get_noise_multiplier  # noqa: PLC0415 - optional dependency

    q = sample_rate if defences.dp == "central" else 1.0
    with warnings.catch_warnings():  # its search tries noise levels whose best RDP order is the largest; the answer's is not
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        sigma = get_noise_multiplier(target_epsilon=defences.dp_epsilon, target_delta=defences.dp_delta, sample_rate=q, steps=rounds, accountant="rdp")
    return dataclasses.replace(defences, dp_noise=float(sigma), dp_epsilon=0.0)


def _rdp():
    try:
        from opacus.accountants import RDPAccountant  # noqa: PLC0415 - optional dependency
        from opacus.accountants.analysis import rdp  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - the dp extra is installed by make setup
        raise ImportError("differential privacy accounting needs Opacus: pip install 'rankfed[dp]'") from e
    return rdp, RDPAccountant.DEFAULT_ALPHAS


class PrivacyLedger:
    """The privacy a run has spent, from Opacus's RDP accountant (picklable: kept in resume.pt
    with the :class:`~rankfed.server.Rounds`).

    Central DP: one subsampled Gaussian mechanism per aggregated round, noise multiplier sigma,
    sampling rate q = clients per round / K (Opacus assumes Poisson sampling; rankfed samples
    a fixed number of clients per round, as DP-FedAvg implementations commonly do, so the
    epsilon is that standard approximation). Local DP: each client's uploads are Gaussian
    mechanisms on its own data with no amplification (the server sees who took part); the
    epsilon reported is the worst client's, over the rounds it took part in.
    """

    def __init__(self, mode: str, sigma: float, sample_rate: float, delta: float):
        self.mode, self.sigma, self.sample_rate, self.delta = mode, float(sigma), float(sample_rate), float(delta)
        self.steps = 0  # central: rounds aggregated
        self.participation: dict[int, int] = {}  # local: client -> rounds it uploaded in

    def step(self, clients: Sequence[int]) -> None:
        """One round aggregated from ``clients``' uploads."""
        if self.mode == "central":
            self.steps += 1
        else:
            for cid in clients:
                self.participation[cid] = self.participation.get(cid, 0) + 1

    def epsilon(self) -> float:
        """Epsilon at ``delta`` so far: what Opacus's ``RDPAccountant.get_epsilon`` gives for this
        mechanism composed over the steps (its RDP of one step, computed once, times the steps)."""
        steps = self.steps if self.mode == "central" else max(self.participation.values(), default=0)
        if steps == 0:
            return 0.0
        analysis, alphas = _rdp()
        one = self.__dict__.get("_rdp_one")
        if one is None:  # one step's RDP at every order (the slow part: once per run)
            q = self.sample_rate if self.mode == "central" else 1.0
            one = self.__dict__["_rdp_one"] = analysis.compute_rdp(q=q, noise_multiplier=self.sigma, steps=1, orders=alphas)
        eps, _ = analysis.get_privacy_spent(orders=alphas, rdp=one * steps, delta=self.delta)
        return float(eps)


def uplink_norm(tensors: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor] | None = None) -> float:
    """The L2 norm of ``tensors`` taken as one vector (minus ``reference`` where given)."""
    total = 0.0
    for name, t in tensors.items():
        d = t.double() if reference is None or name not in reference else t.double() - reference[name].to(t.device).double()
        total += float(d.pow(2).sum())
    return math.sqrt(total)


def _clip(tensors: dict[str, torch.Tensor], scale: float, reference: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in tensors.items():
        if reference is not None and name in reference:
            ref = reference[name].to(t.device, t.dtype)
            out[name] = ref + (t - ref) * scale
        else:
            out[name] = t * scale
    return out


class DefendedSums(RoundSums):
    """A round's :class:`~rankfed.protocol.RoundSums` under :class:`Defences`: ``mean(name)`` is
    the configured aggregator's value of entry ``name`` (the robust ones computed once, from
    the uploads kept), with central DP's noise N(0, std^2) on the sum. The weighted sums, the
    count and the training loss stay those of the accepted uploads."""

    def __init__(self, defences: Defences, *, noise_std: float = 0.0, seed: int = 0):
        super().__init__()
        self.defences, self.noise_std, self.seed = defences, float(noise_std), int(seed)
        self.keeps = defences.aggregator != "mean"
        self.uploads: list[dict[str, torch.Tensor]] = []
        self.weights: list[float] = []
        self._robust: dict[str, torch.Tensor] | None = None
        self.selected: list[int] | None = None  # krum: indices (into the accepted uploads) it kept

    def add(self, tensors: dict[str, torch.Tensor], weight: float, loss: float | None = None) -> None:
        super().add(tensors, weight, loss)
        if self.keeps:
            self.uploads.append({k: v.detach().clone() for k, v in tensors.items()})
            self.weights.append(float(weight))

    def _aggregate(self) -> dict[str, torch.Tensor]:
        if self._robust is None:
            d = self.defences
            if d.aggregator == "median":
                self._robust = coordinate_median(self.uploads)
            elif d.aggregator == "trimmed_mean":
                self._robust = trimmed_mean(self.uploads, d.trim_beta)
            else:
                keep = min(d.krum_keep, len(self.uploads))
                self.selected = krum_select(self.uploads, d.krum_malicious, keep)
                self._robust = krum(self.uploads, self.weights, d.krum_malicious, keep)
        return self._robust

    def mean(self, name: str, like: torch.Tensor | None = None) -> torch.Tensor:
        if self.keeps:
            m = self._aggregate()[name]
        elif self.noise_std:
            s = self.sums[name]
            g = torch.Generator().manual_seed(derive_seed(self.seed, zlib.crc32(name.encode()), _NOISE_TAG))
            noise = torch.randn(s.shape, generator=g, dtype=torch.float64).to(s.device, s.dtype) * self.noise_std
            m = (s + noise) / self.weight
        else:
            return super().mean(name, like)
        return m if like is None else m.to(like.device, like.dtype)


class UploadGuard:
    """One round's defences, applied by :class:`~rankfed.server.validate.RoundFold` to each
    upload that passed the checks (see the module): its weight, its clipping, the round's sums."""

    def __init__(self, defences: Defences, rnd: int, *, bound: float | None, recorded: Sequence[int] | None = None, seed: int = 0):
        self.defences, self.rnd, self.bound = defences, rnd, bound
        self.recorded = recorded
        self.seed = derive_seed(seed, rnd, _NOISE_TAG)
        self.weight_cut: dict[int, tuple[int, float]] = {}  # client -> (claimed, used)
        self.clipped: list[int] = []
        self.norms: dict[int, float] = {}  # client -> norm before clipping (accepted uploads only)

    def weight(self, cid: int, claimed: int) -> float:
        d = self.defences
        if d.dp == "central" or d.sample_weights == "uniform":
            w = 1.0
        else:
            w = float(claimed)
            if d.sample_weights == "recorded" and self.recorded is not None and 0 <= cid < len(self.recorded):
                w = min(w, float(self.recorded[cid]))
            if d.max_sample_weight:
                w = min(w, float(d.max_sample_weight))
            if w < claimed:
                self.weight_cut[cid] = (int(claimed), w)
        return w

    def clip(self, cid: int, tensors: dict[str, torch.Tensor], reference: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        if not self.defences.server_clip:
            return tensors
        norm = uplink_norm(tensors, reference)
        self.norms[cid] = norm
        if self.bound is None or norm <= self.bound:
            return tensors
        self.clipped.append(cid)
        return _clip(tensors, self.bound / norm, reference)

    def sums(self) -> RoundSums:
        d = self.defences
        std = d.dp_noise * d.clip_norm if d.dp == "central" else 0.0
        return DefendedSums(d, noise_std=std, seed=self.seed)

    def forget(self, cid: int) -> None:
        """Client ``cid``'s upload was refused after all (not counted)."""
        self.weight_cut.pop(cid, None)
        self.norms.pop(cid, None)
        if cid in self.clipped:
            self.clipped.remove(cid)


class ClipBound:
    """The server's clipping bound round by round: ``clip_norm``, or with ``clip_quantile`` that
    quantile of the norms of the last ``clip_window`` rounds' accepted uploads."""

    def __init__(self, defences: Defences):
        self.defences = defences
        self.recent: list[list[float]] = []

    def current(self) -> float | None:
        d = self.defences
        if not d.server_clip:
            return None
        norms = [n for r in self.recent for n in r]
        if d.clip_quantile and norms:
            return float(torch.quantile(torch.tensor(norms, dtype=torch.float64), d.clip_quantile))
        return d.clip_norm if d.clip_norm > 0 else None

    def record(self, norms: Sequence[float]) -> None:
        if self.defences.clip_quantile:
            self.recent = (self.recent + [list(norms)])[-self.defences.clip_window :]


class LocalNoise(ClientHalf):
    """Local DP around a client half: every uplink's averaged tensors (its entries that are not
    ``@`` metadata), as one vector, clipped to L2 norm ``clip`` and given Gaussian noise of std
    ``sigma * clip`` on the client, before it is sent (seeded by the client's round seed).

    Only for algorithms whose uplink is the update the server averages
    (:meth:`~rankfed.algorithms.Algorithm.local_noise_unsupported`)."""

    def __init__(self, inner: ClientHalf, clip: float, sigma: float):
        self.inner, self.clip, self.sigma = inner, float(clip), float(sigma)

    def __getattr__(self, name: str):
        if name == "inner":  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.inner, name)

    def privatize(self, uplink: Payload, ctx: ClientContext) -> Payload:
        names = [k for k, v in uplink.items() if not k.startswith("@") and isinstance(v, torch.Tensor) and v.is_floating_point()]
        tensors = {k: uplink[k] for k in names}
        norm = uplink_norm(tensors)
        scale = min(1.0, self.clip / norm) if norm > 0 else 1.0
        g = torch.Generator().manual_seed(derive_seed(ctx.seed, _NOISE_TAG))
        out = dict(uplink)
        with torch.no_grad():
            for k in names:
                t = tensors[k]
                noise = torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device, t.dtype)
                out[k] = t * scale + noise * (self.sigma * self.clip)
        return out

    def fit(self, payload: Payload, ctx: ClientContext) -> Payload:
        return self.privatize(self.inner.fit(payload, ctx), ctx)

    def begin(self, payload: Payload, ctx: ClientContext):
        return self.inner.begin(payload, ctx)

    def end(self, module, ctx: ClientContext, stats) -> Payload:
        return self.privatize(self.inner.end(module, ctx, stats), ctx)

    def fit_cohort(self, payloads, ctxs, compile: bool = False):
        out = self.inner.fit_cohort(payloads, ctxs, compile=compile)
        return None if out is None else [self.privatize(u, c) for u, c in zip(out, ctxs)]

    def cohort_trainer(self, model, trainer, build=None, compile: bool = False):
        return self.inner.cohort_trainer(model, trainer, build, compile)

    def init_replica(self, model):
        return self.inner.init_replica(model)

    def sync(self, payload: Payload, replica) -> None:
        self.inner.sync(payload, replica)

    def restore(self, payload: Payload, replica) -> None:
        self.inner.restore(payload, replica)


def check_local_noise(algorithm, defences: Defences) -> None:
    """ConfigError when ``defences`` has local DP and ``algorithm``'s uplink cannot take its noise."""
    why = algorithm.local_noise_unsupported() if defences.dp == "local" else None
    if why is not None:
        raise bad("federation.dp", defences.dp, f"{algorithm.name}: {why}")


def private_client(algorithm, half: ClientHalf, defences: Defences) -> ClientHalf:
    """``half`` (``algorithm``'s client half), inside :class:`LocalNoise` when ``defences`` has
    local DP (``dp_noise`` resolved)."""
    if defences.dp != "local":
        return half
    check_local_noise(algorithm, defences)
    return LocalNoise(half, defences.clip_norm, defences.dp_noise)
