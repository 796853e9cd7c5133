#!/usr/bin/env python
"""What turns MACs into time on the CPU (#14 item 4): the measurements behind benchmarks/README.md.

    OMP_NUM_THREADS=1 python benchmarks/speed_explore.py --threads 1 --out /tmp/explore.json

Four questions, each timed with :func:`trp.runtimes.measure` (random-normal input, warm-up, median
of timed blocks), every pair of forms in ``--rounds`` interleaved rounds keeping each one's fastest:

1. BatchNorm folding: ResNet-20 (random weights, eval) with BatchNorm against folded, eager, b1 and b128.
2. Memory format: ResNet-20 folded, dense and channel-decomposed at ``speedup(2.5)``, contiguous against
   channels-last at b128.
3. Rank multiples: one 64→64 3×3 conv at 8×8 (ResNet-20's last stage), channel scheme, b128, at ranks
   around multiples of 8.
4. Fusing the two 1×1 convs of a decomposed 1×1 layer (no nonlinearity between them): a 256→64 1×1 conv
   at 56×56 (ResNet-50's first stage), b1, dense (= the fused pair) against its rank-16 and rank-32 pairs.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import trp  # noqa: E402
from trp import runtimes as rt  # noqa: E402
from trp import schemes  # noqa: E402
from trp.bn import fold_bn_  # noqa: E402
from trp.models import create  # noqa: E402

__all__ = ["timed", "explore", "main"]


def timed(forms: dict[str, tuple[nn.Module, Sequence[int], int, str]], rounds: int, min_run_time: float,
          threads: int) -> dict[str, float]:
    """Each form's fastest ms over interleaved rounds (the order reversed every other round)."""
    best = {k: float("inf") for k in forms}
    keys = list(forms)
    for r in range(rounds):
        for k in keys if r % 2 == 0 else keys[::-1]:
            model, shape, batch, runtime = forms[k]
            best[k] = min(best[k], rt.measure(model, shape, batch, runtime, threads, min_run_time))
    return {k: round(v, 4) for k, v in best.items()}


def explore(rounds: int, min_run_time: float, threads: int, log: Callable[[str], None]) -> dict:
    torch.manual_seed(0)
    out: dict = {"threads": threads, "rounds": rounds, "min_run_time": min_run_time, "torch": torch.__version__}
    r20 = create("resnet20").eval()
    folded = copy.deepcopy(r20)
    fold_bn_(folded)
    shape = (3, 32, 32)
    out["bn_folding"] = timed({f"{name} b{b}": (m, shape, b, "eager") for name, m in (("with BN", r20), ("folded", folded))
                               for b in (1, 128)}, rounds, min_run_time, threads)
    log(f"1. BN folding: {out['bn_folding']}")
    low = trp.decompose_(create("resnet20").eval(), trp.speedup(2.5), scheme="channel", input_shape=shape)
    fold_bn_(low)
    out["memory_format"] = timed({f"{name} {r}": (m, shape, 128, r) for name, m in (("dense", folded), ("channel 2.5x", low))
                                  for r in ("eager", "channels_last")}, rounds, min_run_time, threads)
    log(f"2. memory format: {out['memory_format']}")
    conv = nn.Conv2d(64, 64, 3, padding=1)
    ch = schemes.get("channel")
    ranks = (7, 8, 9, 13, 16, 17, 24, 25)
    out["rank_multiples"] = timed({f"rank {k}": (ch.build(conv, k), (64, 8, 8), 128, "eager") for k in ranks},
                                  rounds, min_run_time, threads)
    log(f"3. rank multiples: {out['rank_multiples']}")
    one = nn.Conv2d(256, 64, 1)
    out["fuse_1x1"] = timed({"dense (fused pair)": (one, (256, 56, 56), 1, "eager"),
                             "rank 16 pair": (ch.build(one, 16), (256, 56, 56), 1, "eager"),
                             "rank 32 pair": (ch.build(one, 32), (256, 56, 56), 1, "eager")},
                            rounds, min_run_time, threads)
    log(f"4. 1x1 pair: {out['fuse_1x1']}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-run-time", type=float, default=0.3)
    p.add_argument("--out")
    args = p.parse_args(argv)
    result = explore(args.rounds, args.min_run_time, args.threads, print)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
