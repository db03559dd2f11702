"""The forward table of ``python -m fastattn bench``: fastattn side by side with its peers.

Every case is timed in rounds. In each round fastattn and every peer that has the case run
back to back (the best of a few calls each, the order rotating from round to round), so a
noisy neighbour slows all of them alike; the round's ratio is the fastest peer's time over
fastattn's, and the case reports the median ratio. Ceilings (NumPy sgemm and dgemm, memory
read bandwidth) are measured in the same run, because absolute numbers drift on a shared
machine while ratios taken together do not.

The peers are those registered in :mod:`fastattn.bench.peers` (PyTorch SDPA, ONNX Runtime), one
column each. A peer whose package is missing shows as ``absent``; one that lacks a case shows
``-``. The cases are those of :mod:`fastattn.bench.cases`, and the variants fastattn is timed
against itself (:mod:`fastattn.bench.selfcases`) come after the table.
The exit status is 1 when an output disagrees with the reference or with fastattn beyond
tolerance, 0 otherwise (a missed speed target is reported, never an error: the machine is
shared and noisy).
"""

from __future__ import annotations

import gc
import statistics
import sys
import textwrap
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import reference
from .cases import CASES, CASES_BY_NAME, SHORT_CASES, TOLERANCE, Case, Inputs, make_inputs
from .ceilings import ceilings_line, measure_ceilings
from .machine import machine_info, machine_line
from .peers import ADAPTERS, peers
from .selfcases import SELF_CASES, SELF_CASES_BY_NAME, format_self_table, run_self_case
from .timing import DEFAULT_THREADS, aligned, best_of, blas_threads, calibrate

DEFAULT_ROUNDS = 5
QUICK_ROUNDS = 2

#: float64 elements the reference may hold for one case (scores dominate): 128 MiB.
REFERENCE_BUDGET = 1 << 24


@dataclass
class Row:
    """The result of one case; `times` are medians over rounds of each round's best, seconds."""

    case: str
    shape: str
    dtype: str
    unit: str
    status: dict = field(default_factory=dict)  # impl -> "ok" | "absent" | "-" | "error: ..."
    times: dict = field(default_factory=dict)
    round_times: dict = field(default_factory=dict)
    ratio: float | None = None
    round_ratios: list = field(default_factory=list)
    fastest_peer: str | None = None
    target: float | None = None
    gemm_target: float | None = None
    bw_target: float | None = None
    passed: bool | None = None
    gflops: float | None = None
    gemm_fraction: float | None = None
    kv_gbs: float | None = None
    bw_fraction: float | None = None
    max_error: float | None = None  # fastattn vs the float64 reference
    reference_slice: str = ""
    peer_diff: dict = field(default_factory=dict)  # peer -> max |peer - fastattn|
    correct: bool = True
    note: str = ""


def reference_slice(case: Case, budget: int = REFERENCE_BUDGET) -> tuple[int, int]:
    """(batches, query heads) on which the float64 reference fits `budget` elements.

    Heads are kept in whole kv groups so that grouped-query slices stay consistent.
    """
    per_head = case.L * case.S + case.S * 2 * case.E + case.L * case.E
    fits = max(1, budget // per_head)
    if fits >= case.B * case.H:
        return case.B, case.H
    if fits >= case.H:
        return fits // case.H, case.H
    group = case.H // case.kv_heads
    return 1, max(group, fits // group * group)


def check_outputs(case: Case, inp: Inputs, outputs: dict, row: Row) -> None:
    """Fills the error columns: fastattn vs the reference (on a slice), peers vs fastattn."""
    tol = TOLERANCE[case.dtype]
    fa = outputs.get("fastattn")
    if fa is None:
        return
    nb, nh = reference_slice(case)
    nkv = nh * case.kv_heads // case.H
    mask = None if inp.mask is None else inp.mask[:nb]
    want = reference.attention(inp.q[:nb, :nh].astype(np.float64),
                               inp.k[:nb, :nkv].astype(np.float64),
                               inp.v[:nb, :nkv].astype(np.float64),
                               mask=mask, causal=case.causal, enable_gqa=case.gqa)
    row.max_error = float(np.abs(fa[:nb, :nh] - want).max())
    if (nb, nh) != (case.B, case.H):
        row.reference_slice = f"[:{nb}, :{nh}]"
    row.correct = row.max_error <= tol
    for name, out in outputs.items():
        if name != "fastattn":
            row.peer_diff[name] = float(np.abs(out - fa).max())
            row.correct &= row.peer_diff[name] <= tol


def run_case(case: Case, rounds: int, calls: int, threads: int,
             ceilings: dict | None) -> Row:
    """Times fastattn and the peers on one case, interleaved round by round, and checks them."""
    row = Row(case.name, case.shape, case.dtype, case.unit, target=case.target,
              gemm_target=case.gemm_target, bw_target=case.bw_target, note=case.note)
    inp = make_inputs(case)
    runners, sampling, outputs = {}, {}, {}
    for name in ("fastattn", *peers()):
        adapter = ADAPTERS[name]
        if adapter.missing():
            row.status[name] = "absent"
        elif not adapter.supports(case):
            row.status[name] = "-"
        else:
            try:
                runner = adapter.prepare(inp, case, threads)
                result, sampling[name] = calibrate(runner.call, calls)
                out = np.array(runner.to_numpy(result), copy=True)
                outputs[name] = out.astype(np.float32) if out.dtype.itemsize == 2 else out
                runners[name] = runner
                row.status[name] = "ok"
            except Exception as exc:  # a peer that breaks on a case must not end the run
                row.status[name] = f"error: {type(exc).__name__}: {exc}"

    names = list(runners)
    row.round_times = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)] if names else []
        for name in order:
            row.round_times[name].append(best_of(runners[name].call, *sampling[name]))
    row.times = {name: statistics.median(t) for name, t in row.round_times.items()}
    # Checked after the timing: the reference's BLAS threads busy-wait a while after each
    # call, which would slow whichever implementation ran next.
    check_outputs(case, inp, outputs, row)
    summarize(case, row, ceilings)
    return row


def summarize(case: Case, row: Row, ceilings: dict | None) -> None:
    """Ratio, throughput and the pass/fail verdict from the measured times."""
    timed = [p for p in peers() if p in row.round_times]
    fa = row.round_times.get("fastattn")
    if fa and timed:
        row.round_ratios = [min(row.round_times[p][r] for p in timed) / fa[r]
                            for r in range(len(fa))]
        row.ratio = statistics.median(row.round_ratios)
        row.fastest_peer = min(timed, key=lambda p: row.times[p])
    if fa:
        t = row.times["fastattn"]
        row.gflops = case.flops / t / 1e9
        if ceilings and not case.memory_bound:  # decode is judged by bandwidth instead
            peak = ceilings["dgemm_gflops" if case.dtype == "float64" else "sgemm_gflops"]
            row.gemm_fraction = row.gflops / peak
        if case.memory_bound:
            row.kv_gbs = case.kv_bytes / t / 1e9
            if ceilings:
                row.bw_fraction = row.kv_gbs / ceilings["read_gbs"]
    if case.target is not None and row.ratio is not None:
        row.passed = row.ratio >= case.target
        # Without the ceilings (skipped) only the ratio can be judged.
        if case.gemm_target is not None:
            row.passed &= row.gemm_fraction is None or row.gemm_fraction >= case.gemm_target
        if case.bw_target is not None:
            row.passed &= row.bw_fraction is None or row.bw_fraction >= case.bw_target


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------

def columns() -> tuple[str, ...]:
    """The table's header: a time column for fastattn and one for each peer."""
    return ("case", "shape", "fastattn", *peers(), "ratio", "target", "pass", "GFLOP/s",
            "%gemm", "K/V GB/s", "max err", "peer diff")


def fmt_time(row: Row, name: str) -> str:
    status = row.status.get(name, "-")
    if status != "ok":
        return "error" if status.startswith("error") else status
    t = row.times[name]
    return f"{t * 1e6:.1f} us" if row.unit == "us" else f"{t * 1e3:.1f} ms"


def fmt_cells(row: Row) -> list[str]:
    """One table line as strings, in the order of columns()."""
    target = "-" if row.target is None else f">={row.target:g}"
    if row.gemm_target is not None:
        target += f", {row.gemm_target:.0%} gemm"
    if row.bw_target is not None:
        target += f", {row.bw_target:.0%} read"
    verdict = {True: "PASS", False: "FAIL", None: "-"}[row.passed]
    bw = "-"
    if row.kv_gbs is not None:
        bw = f"{row.kv_gbs:.1f}"
        if row.bw_fraction is not None:
            bw += f" ({row.bw_fraction:.0%})"
    err = "-" if row.max_error is None else f"{row.max_error:.1e}{row.reference_slice}"
    diff = ", ".join(f"{p} {d:.1e}" for p, d in row.peer_diff.items()) or "-"
    if not row.correct:
        diff += " WRONG"
    return [
        row.case, row.shape + ("" if row.dtype == "float32" else f" {row.dtype}"),
        fmt_time(row, "fastattn"), *(fmt_time(row, p) for p in peers()),
        "-" if row.ratio is None else f"{row.ratio:.2f}",
        target, verdict,
        "-" if row.gflops is None else f"{row.gflops:.3g}",
        "-" if row.gemm_fraction is None else f"{row.gemm_fraction:.0%}",
        bw, err, diff,
    ]


def format_table(rows: list[Row], markdown: bool = False) -> str:
    """The rows as an aligned text table, or as a Markdown table."""
    head = columns()
    cells = [list(head)] + [fmt_cells(r) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(c) + " |" for c in cells]
        lines.insert(1, "|" + "|".join("---" for _ in head) + "|")
        return "\n".join(lines)
    return aligned(cells)


LEGEND = ("ratio: median over rounds of (fastest peer time / fastattn time); > 1 means fastattn "
          "is faster. GFLOP/s counts 4*B*H*L*S*E (half when causal); %gemm is against NumPy's "
          "sgemm (dgemm for float64). max err: fastattn vs the float64 reference (on [batches, "
          "heads] when sliced); peer diff: max |peer - fastattn|.")


def resolve_cases(cases) -> list[Case]:
    """Case objects from names (or Case objects); None means all."""
    if cases is None:
        return list(CASES)
    out = []
    for c in cases:
        if isinstance(c, Case):
            out.append(c)
        elif c in CASES_BY_NAME:
            out.append(CASES_BY_NAME[c])
        else:
            raise ValueError(f"unknown case {c!r}; cases: {', '.join(CASES_BY_NAME)}")
    return out


@dataclass
class Report:
    """Everything one run measured: the machine, the ceilings (or None) and the rows."""

    machine: dict
    ceilings: dict | None
    rounds: int
    calls: int
    rows: list[Row]
    self_rows: list = field(default_factory=list)

    def to_json(self) -> dict:
        return dict(asdict(self), tolerance=TOLERANCE)


def benchmark(cases=None, rounds: int | None = None, quick: bool = False, file=sys.stdout,
              threads: int = DEFAULT_THREADS, markdown: bool = False, ceilings: bool = True,
              calls: int | None = None) -> Report:
    """Runs the cases, prints the machine line, the ceilings and the table.

    `cases`: names or :class:`Case` objects (None: all). `rounds` defaults to 5 (2 with
    `quick`); `calls` (best of, per round) to 3 (2 with `quick`). `ceilings=False` skips the
    ceiling measurements (a few seconds and a 1 GiB array) and their columns.
    """
    names = None if cases is None else [c if isinstance(c, str) else c.name for c in cases]
    self_selected = [c for c in SELF_CASES if names is None or c.name in names]
    if names is not None:
        cases = [c for c in cases if (c if isinstance(c, str) else c.name) not in
                 SELF_CASES_BY_NAME]
    selected = resolve_cases(cases) if cases is None or cases else []
    rounds = rounds or (QUICK_ROUNDS if quick else DEFAULT_ROUNDS)
    calls = calls or (2 if quick else 3)
    info = machine_info(threads)
    print(machine_line(info), file=file, flush=True)
    for name in peers():
        why = ADAPTERS[name].missing()
        if why:
            print(f"  {name} is absent: {why}", file=file)
    ceil = measure_ceilings(threads) if ceilings else None
    if ceil:
        print(ceilings_line(ceil), file=file, flush=True)
    rows = []
    with blas_threads(threads):  # the reference's and the NumPy peer's matmuls
        for case in selected:
            rows.append(run_case(case, rounds, calls, threads, ceil))
            gc.collect()  # the big cases hold a few GB between them otherwise
    if rows:
        print(format_table(rows, markdown), file=file)
        print(textwrap.fill(LEGEND, 100), file=file, flush=True)
    self_rows = []
    if self_selected:
        with blas_threads(threads):
            for sc in self_selected:
                self_rows.append(run_self_case(sc, rounds, calls, threads))
                gc.collect()
        print("\nfastattn against itself (ratio: median of baseline time / variant time):",
              file=file)
        print(format_self_table(self_rows), file=file, flush=True)
    return Report(info, ceil, rounds, calls, rows, self_rows)


def run_table(cases=None, rounds: int | None = None, quick: bool = False, file=sys.stdout,
              **options) -> list[Row]:
    """:func:`benchmark` (same arguments), returning only the table's rows."""
    return benchmark(cases, rounds, quick, file, **options).rows


def short_table(file=sys.stdout, threads: int = DEFAULT_THREADS) -> list[Row]:
    """A few small cases in a few seconds, for ``python -m fastattn``; no ceilings."""
    return run_table(SHORT_CASES, rounds=3, quick=True, file=file, threads=threads,
                     ceilings=False)
