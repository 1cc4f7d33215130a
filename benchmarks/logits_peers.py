"""fastkl against PyTorch on the CPU for logits at an LLM vocabulary size (issue 13's peer).

    python benchmarks/logits_peers.py [--rows 1000] [--vocab 32000] [--threads N] [--rounds 5]

What an LLM user would write instead of fastkl: `kl_div(log_softmax(q),
log_softmax(p), log_target=True).sum(-1)` in float32 and float64, with
torch's threads set to fastkl's. Both the time (as a ratio to fastkl, within
each round) and the relative error against an extended-precision reference
are printed, for a teacher/student gap (logit noise 0.5) and a
quantisation-sized one (0.01), where float32 sums of 32,000 terms lose the
small KL. Needs a CPU build of PyTorch (not a fastkl dependency).
"""

from __future__ import annotations

import argparse

from fastkl.bench import throughput as B


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000)
    ap.add_argument("--vocab", type=int, default=32_000)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-load", type=float, default=None)
    args = ap.parse_args()
    print(f"machine: {B.machine()}")
    lines, _ = B.logits_report(args.rows, args.vocab, threads=args.threads, rounds=args.rounds,
                               max_load=args.max_load)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
