"""The command line of ``python -m fastattn bench``: the forward table by default, the training
table (``--backward``) or the whole-model one (``--e2e``) instead, and the plot (``--plot``)."""

from __future__ import annotations

import argparse
import json
import sys

from .cases import CASES_BY_NAME
from .forward import DEFAULT_ROUNDS, QUICK_ROUNDS, Report, benchmark
from .peers import ADAPTERS, peers
from .selfcases import SELF_CASES_BY_NAME
from .timing import DEFAULT_THREADS


def peer_titles() -> str:
    """The peers as the help names them: "A", "A and B", "A, B and C"."""
    titles = [ADAPTERS[name].title or name for name in peers()]
    return " and ".join(filter(None, [", ".join(titles[:-1]), titles[-1]])) if titles else "none"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m fastattn bench",
        description=f"Benchmark fastattn against {peer_titles()}, interleaved round by round.")
    p.add_argument("--quick", action="store_true", help="fewer rounds and calls")
    p.add_argument("--cases", help="comma-separated case names; all by default: "
                   + ", ".join(list(CASES_BY_NAME) + list(SELF_CASES_BY_NAME)))
    p.add_argument("--rounds", type=int, help=f"rounds per case (default {DEFAULT_ROUNDS}, "
                   f"{QUICK_ROUNDS} with --quick)")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                   help=f"threads for every implementation (default {DEFAULT_THREADS})")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--plot", metavar="FILE.png",
                   help="also plot time against L=S (256..4096) for (1,8,L,L,64), log-log")
    p.add_argument("--markdown", action="store_true", help="print the table in Markdown")
    p.add_argument("--backward", action="store_true",
                   help="instead: the training table, forward + backward against PyTorch's "
                        "SDPA + autograd.grad, and our backward against our forward")
    p.add_argument("--kvcache", action="store_true",
                   help="instead: attention over a KV cache (contiguous and paged decode, a "
                        "long context, the append) against fastattn.attention and PyTorch SDPA")
    p.add_argument("--e2e", action="store_true",
                   help="instead, a whole Llama-shaped model (random weights, 4096-token "
                        "prompt, 64 decoded tokens), fastattn against transformers' sdpa, "
                        "float32 and bfloat16; needs fastattn[transformers]")
    args = p.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.threads < 1:
        p.error("--threads must be at least 1")
    if args.cases is not None:
        args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
        known = list(CASES_BY_NAME) + list(SELF_CASES_BY_NAME)
        unknown = [c for c in args.cases if c not in known]
        if unknown:
            p.error(f"unknown case(s) {', '.join(unknown)}; cases: {', '.join(known)}")
    return args


def write_json(path: str, report: Report) -> None:
    with open(path, "w") as f:
        json.dump(report.to_json(), f, indent=1)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m fastattn bench``; returns the exit status."""
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.kvcache:
        from .kvcache import kvcache_table
        from .machine import machine_info, machine_line

        print(machine_line(machine_info(args.threads)))
        print(kvcache_table(args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS),
                            2 if args.quick else 3, args.threads))
        return 0
    if args.e2e:
        from . import e2e

        e2e.run(threads=args.threads, rounds=args.rounds or (1 if args.quick else 2))
        return 0
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:  # checked first, so a long run does not end in this error
            print("error: --plot needs matplotlib, which is not installed "
                  "(pip install matplotlib, or pip install 'fastattn[bench]')", file=sys.stderr)
            return 2
    if args.backward:
        from .backward import train_table

        rows = train_table(args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS),
                           2 if args.quick else 3, args.threads)
        return 0 if all(r.get("correct", True) for r in rows) else 1
    report = benchmark(args.cases, rounds=args.rounds, quick=args.quick, threads=args.threads,
                       markdown=args.markdown)
    if args.json:
        write_json(args.json, report)
        print(f"results written to {args.json}")
    if args.plot:
        from .sweep import plot

        plot(args.plot, threads=args.threads, rounds=QUICK_ROUNDS if args.quick else 3)
        print(f"plot written to {args.plot}")
    return 0 if all(r.correct for r in report.rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
