"""PowerSGD and GreedyLore on simulated workers (threads sharing a mean all-reduce)."""

import pickle

import pytest
import torch

from rankfed.compress.lowrank import LowRankState, ThreadGroup, dense, greedylore, powersgd

SHAPES = {"conv": (16, 8, 3, 3), "fc": (32, 24), "bias": (32,), "small": (4, 3)}


def _grads(rank: int, step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return {k: torch.randn(*s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()}


def _run(make, workers=3, steps=6, seed=0):
    """Each worker reduces its own gradients for `steps` steps; returns per step, per worker:
    (X = g + e before, the reduced gradients, e after, stats)."""
    group = ThreadGroup(workers)
    comps = [make() for _ in range(workers)]
    states = [comps[0].init() for _ in range(workers)]
    log = []
    for step in range(steps):
        def work(rank, allreduce, step=step):
            st = states[rank]
            g = _grads(rank, step)
            before = {k: g[k].reshape(g[k].shape[0], -1) + st.error[k] if k in st.error else g[k].reshape(g[k].shape[0], -1).clone() for k in g}
            out, st = comps[rank].reduce(g, st, allreduce, seed)
            states[rank] = st
            return before, out, {k: v.clone() for k, v in st.error.items()}
        log.append(group.run(work))
    return log, states


def _plain_mean(step, workers=3):
    gs = [_grads(r, step) for r in range(workers)]
    return {k: sum(g[k] for g in gs) / workers for k in SHAPES}


def test_dense_is_the_plain_mean():
    log, states = _run(dense)
    for step, per_worker in enumerate(log):
        for _, out, _ in per_worker:
            for k, v in _plain_mean(step).items():
                torch.testing.assert_close(out[k], v)
    assert states[0].stats.ratio == 1.0


@pytest.mark.parametrize("make", [lambda: greedylore(rank=32, update_gap=3, min_saving=0), lambda: greedylore(rank=200, update_gap=1000, warmup_steps=1)])
def test_greedylore_at_full_rank_is_the_plain_mean(make):
    # rank >= min(n, m): the chosen directions span everything, nothing is left in the error
    log, _ = _run(make)
    for step, per_worker in enumerate(log):
        for _, out, err in per_worker:
            for k, v in _plain_mean(step).items():
                torch.testing.assert_close(out[k], v, rtol=1e-9, atol=1e-9)
            for e in err.values():
                assert e.abs().max() < 1e-9


@pytest.mark.parametrize("make", [lambda: greedylore(rank=2, update_gap=3, warmup_steps=1), lambda: powersgd(rank=2)])
def test_error_buffer_is_what_was_not_sent(make):
    log, states = _run(make, steps=7)
    compressed = [k for k in SHAPES if k in states[0].error]
    assert set(compressed) == {"conv", "fc"}  # bias is 1-D; "small" would not save 2x
    for per_worker in log:
        outs = [o for _, o, _ in per_worker]
        for k in SHAPES:  # every worker uses the same gradient
            for o in outs[1:]:
                torch.testing.assert_close(o[k], outs[0][k], rtol=0, atol=0)
        for k in compressed:
            # mean over workers of X = what was applied + mean of the new errors
            mean_x = sum(b[k] for b, _, _ in per_worker) / len(per_worker)
            applied = outs[0][k].reshape(mean_x.shape)
            mean_e = sum(e.get(k, torch.zeros_like(mean_x)) for _, _, e in per_worker) / len(per_worker)  # none yet in warm-up
            torch.testing.assert_close(applied + mean_e, mean_x, rtol=1e-9, atol=1e-9)
    stats = states[0].stats
    assert stats.steps == 7 and stats.sent < stats.dense


def test_greedylore_sends_rank_times_the_long_side_plus_the_scores():
    comp = greedylore(rank=2, update_gap=100, warmup_steps=0)
    log, states = _run(lambda: comp, workers=1, steps=2)
    # step 0 refreshes (dense), step 1 sends for fc (32 x 24): k = 24 scores + 2 * 32; conv (16 x 72): 16 + 2 * 72
    dense_rest = 32 + 4 * 3  # bias and "small" go dense
    assert states[0].stats.last_sent == (24 + 2 * 32) + (16 + 2 * 72) + dense_rest
    assert pickle.loads(pickle.dumps(states[0])).stats.last_sent == states[0].stats.last_sent


def test_greedylore_picks_the_directions_with_the_most_energy():
    # One worker, a gradient with energy only along two known left singular directions:
    # after a refresh on it, the greedy step must keep exactly those and send them losslessly.
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64))
    g = 5 * torch.outer(u[:, 1], v[:, 0]) + 3 * torch.outer(u[:, 6], v[:, 1]) + 0.1 * u[:, :8] @ v[:, 2:10].T
    for exact in (False, True):  # probe estimates and exact energies agree on so clear a case
        comp = greedylore(rank=2, update_gap=100, min_saving=0, exact_scores=exact)
        state = comp.init()
        ident = lambda t: t.clone()  # noqa: E731  (one worker: the mean is itself)
        comp.reduce({"w": g}, state, ident, 0)  # refresh: basis from g's SVD
        out, state = comp.reduce({"w": g}, state, ident, 0)
        top2 = u[:, [1, 6]]
        torch.testing.assert_close(out["w"], top2 @ top2.T @ g, rtol=1e-9, atol=1e-9)
        # exact scores all-reduce U^T X (8 x 40) instead of 8 probes; R is 2 x 40 either way
        assert state.stats.last_sent == (8 * 40 if exact else 8) + 2 * 40


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="rank must be an int >= 1, got 0"):
        greedylore(rank=0)
    with pytest.raises(ValueError, match="update_gap must be an int >= 1, got 0"):
        greedylore(update_gap=0)
    with pytest.raises(ValueError, match="warmup_steps must be an int >= 0, got -1"):
        greedylore(warmup_steps=-1)
    assert isinstance(powersgd().init(), LowRankState)


# -- the uplink forms (one client compresses its update alone) ------------------------------------------

from rankfed.compress import build_compressor  # noqa: E402
from rankfed.wire import decode, encode  # noqa: E402


@pytest.mark.parametrize("spec", ["powersgd", "greedylore"])
def test_uplink_lowrank_error_feedback_keeps_everything(spec):
    comp = build_compressor(spec, compress_rank=2, update_gap=3)
    g = torch.Generator().manual_seed(0)
    updates = [{"w": torch.randn(20, 30, generator=g), "conv": torch.randn(12, 4, 3, 3, generator=g), "b": torch.randn(20, generator=g)} for _ in range(5)]
    state = comp.init(updates[0])
    sent_total = {k: torch.zeros_like(v) for k, v in updates[0].items()}
    for i, u in enumerate(updates):
        entries, state = comp.compress(u, state, 7)
        got = comp.decompress(decode(encode(entries)))  # what the server reads
        for k in u:
            sent_total[k] += got[k]
        if i % 3 != 0 or spec == "powersgd":  # greedylore's every 3rd upload (the first included) is dense
            assert "w:A" in entries and "w" not in entries and entries["w:A"].shape[1] == 2
        torch.testing.assert_close(got["b"], u["b"])  # 1-D: dense
    # everything the client ever had to send = what the server got + what the client still holds
    for k in ("w", "conv"):
        held = state.error[k].reshape(updates[0][k].shape)
        torch.testing.assert_close(sent_total[k] + held, sum(u[k] for u in updates), rtol=1e-5, atol=1e-5)


def test_uplink_greedylore_sends_the_top_energy_directions_of_its_basis():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(50, 50, dtype=torch.float64))
    first = u @ torch.diag(torch.arange(10, 0, -1, dtype=torch.float64)) @ v[:, :10].T  # sets the basis u
    comp = build_compressor("greedylore", compress_rank=2, update_gap=100)
    state = comp.init({"w": first})
    entries, state = comp.compress({"w": first}, state, 0)
    assert "w" in entries  # the first upload is dense and sets the basis
    second = 4 * torch.outer(u[:, 7], v[:, 0]) + 2 * torch.outer(u[:, 2], v[:, 1]) + 0.01 * torch.outer(u[:, 5], v[:, 2])
    entries, state = comp.compress({"w": second}, state, 0)
    top = u[:, [7, 2]]
    torch.testing.assert_close(comp.decompress(entries)["w"], top @ top.T @ second, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="used alone"):
        build_compressor("topk+powersgd")
    with pytest.raises(ValueError, match="compress_rank must be an int >= 1, got 0"):
        build_compressor("powersgd", compress_rank=0)
