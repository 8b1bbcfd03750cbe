"""FedHM's client step with base-free factorised layers vs the old zero-weight base (issue 18, item 4).

FedHM's clients train only the factors of each factorised layer; the layer used to be
``base_layer(x) + up(down(x))`` with the base weight zeroed, so every step still paid the dense
convolution (forward and backward) of a zero kernel. A base-free layer computes
``up(down(x)) + bias`` only. Both paths run here on the same factorised model (the old one by
switching ``base_free`` off: the code path before the change), interleaved repeat by repeat, so
the ratio is measured in one run on one machine. The two give the same output (bitwise: tested).

    python benchmarks/fedhm_step.py --model resnet18 --steps 10 --repeats 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SHAPES = {"resnet18": (3, 32, 32), "cnn3": (3, 32, 32), "cnn2": (1, 28, 28)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18", choices=sorted(SHAPES))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", default=str(HERE / "results" / "fedhm_step.md"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from rankfed.algorithms.fedhm import FedHM, _factorised_model, factor_ranks
    from rankfed.lowrank import lora_layers
    from rankfed.models import build_model

    torch.manual_seed(0)
    shape = SHAPES[args.model]
    model = build_model(args.model, shape, 10)
    algo = FedHM()
    wrapped = _factorised_model(model, factor_ranks(model, algo))
    layers = list(lora_layers(wrapped).values())
    x = torch.randn(args.batch_size, *shape)
    y = torch.randint(0, 10, (args.batch_size,))
    params = [q for q in wrapped.parameters() if q.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01)

    def step_time(base_free: bool) -> float:
        for layer in layers:
            layer.base_free = base_free
        torch.nn.functional.cross_entropy(wrapped(x), y).backward()  # warm-up
        opt.zero_grad()
        t = time.perf_counter()
        for _ in range(args.steps):
            loss = torch.nn.functional.cross_entropy(wrapped(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return (time.perf_counter() - t) / args.steps

    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):  # interleaved, so load on the machine hits both alike
        for flag in (False, True):
            times[flag].append(step_time(flag))
    old, new = statistics.median(times[False]), statistics.median(times[True])
    lines = [
        "# FedHM client step: base-free factorised layers vs the zero-weight base", "",
        f"Command: `python benchmarks/fedhm_step.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, Python {platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M')}", "",
        f"{args.model}, FedHM's default ranks (out // 4; the stem conv1 full), batch {args.batch_size}, SGD, {args.steps} steps x {args.repeats} repeats (medians).", "",
        "| layer path | s/step | vs zero-weight base |", "|---|---:|---:|",
        f"| zero-weight base + factors (before) | {old:.4f} | 1.00 |",
        f"| base-free factors (after) | {new:.4f} | {new / old:.2f} |",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
