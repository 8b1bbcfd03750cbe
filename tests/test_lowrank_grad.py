"""PowerSGD and GreedyLore on simulated workers (threads sharing a mean all-reduce)."""

import pickle

import pytest
import torch

from rankfed.compress.lowrank import LowRankState, ThreadGroup, _name_seed, _step_seed, dense, greedylore, powersgd, random_basis, random_subspace

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


@pytest.mark.parametrize(
    "make",
    [
        lambda: greedylore(rank=2, update_gap=3, warmup_steps=1),
        lambda: greedylore(rank=2, update_gap=3, probes=3),
        lambda: powersgd(rank=2),
        lambda: powersgd(rank=2, warmup_steps=2),
        lambda: random_subspace(rank=2),
        lambda: random_subspace(rank=2, warmup_steps=2),
    ],
)
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
    with pytest.raises(ValueError, match="probes must be an int >= 1, got 0"):
        greedylore(probes=0)
    with pytest.raises(ValueError, match="dense_patterns must be a list"):
        random_subspace(dense_patterns="fc*")
    with pytest.raises(ValueError, match="warmup_steps must be an int >= 0"):
        random_subspace(warmup_steps=-2)
    assert isinstance(powersgd().init(), LowRankState)


# -- dense patterns, probes, the random subspace, diagnostics, state dicts -------------------------------

ALL = {"powersgd": powersgd, "greedylore": greedylore, "random": random_subspace}


@pytest.mark.parametrize("name", list(ALL))
def test_dense_patterns_leave_matched_parameters_exactly_the_mean(name):
    log, states = _run(lambda: ALL[name](rank=2, min_saving=0, dense_patterns=["fc", "sm*"]), steps=4)
    assert set(states[0].error) == {"conv"}  # fc and small matched: never compressed, no error buffer
    for step, per_worker in enumerate(log):
        mean = _plain_mean(step)
        for _, out, _ in per_worker:
            for k in ("fc", "small", "bias"):
                torch.testing.assert_close(out[k], mean[k], rtol=0, atol=0)
    assert not torch.equal(log[-1][0][1]["conv"], _plain_mean(3)["conv"])  # conv still compressed (step 3 is no refresh)
    comp = ALL[name](rank=2, dense_patterns=["*.weight"])
    assert not comp.compressed("layer.weight", (64, 64)) and comp.compressed("layer.w", (64, 64))


def _old_greedy_pick(basis, xs, seed, step, name, rank):
    """GreedyLore's K = 1 scores as rankfed computed them before probes existed (one worker)."""
    gen = torch.Generator().manual_seed(_name_seed(seed + step, name))
    z = torch.randn(basis.shape[1], xs.shape[1], generator=gen).to(dtype=xs.dtype)
    score = ((basis.T @ xs) * z).sum(1)
    return basis[:, torch.topk(score.square(), rank).indices]


def test_probes_count_k_numbers_per_direction_and_one_probe_is_the_old_estimator():
    sent = {}
    for k in (1, 3):
        log, states = _run(lambda k=k: greedylore(rank=2, update_gap=100, probes=k), workers=2, steps=3)
        sent[k] = states[0].stats.last_sent
    # fc (32 x 24) has 24 directions, conv (16 x 72) 16: two more probes each
    assert sent[3] - sent[1] == 2 * (24 + 16)
    comp = greedylore(rank=2, update_gap=100, min_saving=0, probes=1)
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(12, 30, generator=g, dtype=torch.float64) for _ in range(3)]
    state, ident = comp.init(), (lambda t: t.clone())
    comp.reduce({"w": grads[0]}, state, ident, 7)  # refresh
    for step in (1, 2):
        x = grads[step] + state.error["w"]
        p = _old_greedy_pick(state.basis["w"], x, 7, step, "w", 2)
        out, state = comp.reduce({"w": grads[step]}, state, ident, 7)
        assert torch.equal(out["w"], p @ (p.T @ x)) and torch.equal(state.error["w"], x - p @ (p.T @ x))


def test_random_subspace_each_worker_keeps_exactly_what_it_did_not_send():
    workers, seed = 3, 5
    log, states = _run(lambda: random_subspace(rank=3), workers=workers, steps=4, seed=seed)
    assert set(states[0].error) == {"conv", "fc"}
    dims = {"conv": (16, 72), "fc": (32, 24)}
    bases = []
    for step, per_worker in enumerate(log):
        for k, (n, m) in dims.items():
            s = min(n, m)
            p = random_basis(_step_seed(seed, step, k), s, 3, dtype=torch.float64)  # what every worker drew
            torch.testing.assert_close(p.T @ p, torch.eye(3, dtype=torch.float64))
            side = lambda t: t if n <= m else t.T  # noqa: E731
            r_local = [p.T @ side(before[k]) for before, _, _ in per_worker]
            for (before, out, err), r in zip(per_worker, r_local):  # each worker's own buffer
                torch.testing.assert_close(side(before[k]), p @ r + side(err[k]), rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(p.T @ side(err[k]), torch.zeros_like(r), rtol=0, atol=1e-12)
                torch.testing.assert_close(side(out[k].reshape(n, m)), p @ (sum(r_local) / workers), rtol=1e-12, atol=1e-12)
                assert torch.equal(out[k], per_worker[0][1][k])  # identical on every worker
            bases.append(p)
    assert not torch.allclose(bases[0], bases[2])  # a new subspace every step
    # r * max(n, m) numbers per matrix, nothing else; bias and "small" dense
    assert states[0].stats.last_sent == 3 * 72 + 3 * 32 + 32 + 4 * 3


def test_diagnostics_match_a_hand_computation():
    workers, seed = 2, 1
    log, states = _run(lambda: random_subspace(rank=2, warmup_steps=1), workers=workers, steps=1, seed=seed)
    assert states[0].stats.last_captured is None and states[0].stats.last_residual is None  # warm-up: nothing compressed
    group = ThreadGroup(workers)
    comps = [random_subspace(rank=2) for _ in range(workers)]
    sts = [c.init() for c in comps]
    grads = [_grads(r, 9) for r in range(workers)]

    def work(rank, allreduce):
        comps[rank].reduce(grads[rank], sts[rank], allreduce, seed)
        return sts[rank].stats.last_captured, sts[rank].stats.last_residual

    got = group.run(work)
    for rank in range(workers):
        cap = x2 = e2 = g2 = 0.0
        for k, (n, m) in {"conv": (16, 72), "fc": (32, 24)}.items():
            x = grads[rank][k].reshape(n, -1)
            xs = x if n <= m else x.T
            p = random_basis(_step_seed(seed, 0, k), min(n, m), 2, dtype=torch.float64)
            cap += float((p @ (p.T @ xs)).square().sum())
            x2 += float(xs.square().sum())
            e2 += float((xs - p @ (p.T @ xs)).square().sum())
            g2 += float(x.square().sum())
        assert got[rank][0] == pytest.approx(cap / x2, rel=1e-9) and got[rank][1] == pytest.approx((e2 / g2) ** 0.5, rel=1e-9)
    assert got[0] != got[1]  # each worker's own X


@pytest.mark.parametrize("name", list(ALL))
def test_diagnostics_are_fractions_and_a_refresh_captures_everything(name):
    make = lambda: ALL[name](rank=2, warmup_steps=1, update_gap=3)  # noqa: E731  (update_gap: greedylore only)
    group = ThreadGroup(2)
    comps = [make() for _ in range(2)]
    states = [c.init() for c in comps]
    for step in range(6):
        def work(rank, allreduce, step=step):
            comps[rank].reduce(_grads(rank, step), states[rank], allreduce, 0)
            st = states[rank].stats
            return st.last_captured, st.last_residual

        for cap, res in group.run(work):
            if step == 0:
                assert cap is None and res is None
            elif name == "greedylore" and step in (1, 4):  # refreshes: X sent whole, no error left
                assert cap == 1.0 and res == 0.0
            else:
                assert 0.0 < cap < 1.0 and res > 0.0


def test_state_dicts_round_trip_and_continue_bitwise():
    import io

    from rankfed.ddp import LowRankHookState

    group = ThreadGroup(2)
    for name in ALL:
        comps = [ALL[name](rank=2, update_gap=5) for _ in range(2)]
        states = [c.init() for c in comps]
        for step in range(3):
            group.run(lambda rank, ar, step=step: comps[rank].reduce(_grads(rank, step), states[rank], ar, 4))
        buffers = []
        for st in states:  # through torch.save with weights_only=True: plain tensors, ints and dicts only
            buf = io.BytesIO()
            torch.save(st.state_dict(), buf)
            buf.seek(0)
            buffers.append(torch.load(buf, weights_only=True))
        copies = [LowRankState.from_state_dict(d) for d in buffers]
        assert copies[0].step == 3 and copies[0].stats.steps == 3 and copies[0].stats.last_sent == states[0].stats.last_sent
        assert copies[0].stats.last_captured == states[0].stats.last_captured
        assert not torch.equal(copies[0].error["fc"], copies[1].error["fc"])  # every worker its own buffer
        outs = {}
        for label, sts in (("orig", states), ("copy", copies)):
            outs[label] = group.run(lambda rank, ar, sts=sts: comps[rank].reduce(_grads(rank, 3), sts[rank], ar, 4)[0])
        for a, b in zip(outs["orig"], outs["copy"]):
            for k in a:
                assert torch.equal(a[k], b[k])
        for k in states[0].error:
            assert torch.equal(states[0].error[k], copies[0].error[k])
        hook = LowRankHookState(name, {"rank": 2})
        hook.lowrank = states[1]
        again = LowRankHookState(name, {"rank": 2})
        again.load_state_dict(hook.state_dict())
        assert again.lowrank.step == 4 and all(torch.equal(again.lowrank.error[k], v) for k, v in states[1].error.items())
        with pytest.raises(ValueError, match="compressor"):
            LowRankHookState("none").load_state_dict(hook.state_dict())


def test_for_model_sends_embeddings_and_the_output_head_dense_by_default():
    from rankfed.ddp import LowRankHookState, output_head
    from rankfed.models.text import CharTransformer
    from rankfed.models.vision import MLP

    lm = CharTransformer((16,), 40, d_model=32, n_heads=2, n_layers=1, ff=64)
    mlp = MLP((1, 28, 28), 10)
    assert output_head(lm) == "fc" and output_head(mlp) == "fc3" and output_head(torch.nn.ReLU()) is None
    for model, dense_names in ((lm, {"embed.weight", "pos_embed.weight", "fc.weight"}), (mlp, {"fc3.weight"})):
        matrices = {n: p.shape for n, p in model.named_parameters() if p.dim() >= 2}
        for compressor in ALL:
            state = LowRankHookState.for_model(model, compressor, rank=2, min_saving=0)
            assert {n for n, s in matrices.items() if not state._comp.compressed(n, s)} == dense_names
            everything = LowRankHookState.for_model(model, compressor, rank=2, min_saving=0, dense_patterns=[], dense_head=False)
            assert all(everything._comp.compressed(n, s) for n, s in matrices.items())
        only_head = LowRankHookState.for_model(model, "greedylore", rank=2, min_saving=0, dense_patterns=[])
        assert {n for n, s in matrices.items() if not only_head._comp.compressed(n, s)} == {f"{output_head(model)}.weight"}


# -- the uplink forms (one client compresses its update alone) ------------------------------------------

from rankfed.compress import build_compressor  # noqa: E402
from rankfed.wire import decode, encode  # noqa: E402


@pytest.mark.parametrize("spec", ["powersgd", "greedylore", "random"])
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
        if spec == "random":  # R (2 x 30) and the seed the server redraws P from; nothing else for w
            assert {k for k in entries if k.startswith("w")} == {"w:R", "w:seed", "w:shape"} and entries["w:R"].shape == (2, 30)
        elif i % 3 != 0 or spec == "powersgd":  # greedylore's every 3rd upload (the first included) is dense
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
