"""fastattn over Dask: one problem on local dask.distributed clusters of 1 and of 2 workers,
against the in-memory call on 1 and 2 threads.

Usage: python bench/dask_bench.py [--shape B,H,L,S,E] [--q-chunk N] [--k-chunk N] [--causal]
                                  [--workers 1,2] [--repeat N] [--dtype float32]

Each worker is a process with one thread (``dask.distributed`` sets ``OMP_NUM_THREADS=1`` in its
workers, so each kernel call uses one core). Two timings per cluster: "resident" has the inputs
already on the workers (``persist``) and leaves the result there, the steady state of a pipeline;
"from NumPy" ships the NumPy inputs to the cluster and gathers the result back, the cost of a
one-off call from a notebook. All clusters stay up and every round times every configuration
in turn, so that load from other programs falls on all of them alike; the table shows the best
of ``--repeat`` rounds, in seconds. Needs the ``dask`` extra.
"""

from __future__ import annotations

import argparse
import contextlib
import time
import warnings

import numpy as np


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(shape=(4, 8, 2048, 2048, 64), q_chunk=1024, k_chunk=512, causal=False,
        workers=(1, 2), repeat=3, dtype="float32") -> list[tuple[str, float, str]]:
    """Rows (what, best seconds, note) of the table; prints nothing."""
    import dask.array as da
    from dask.distributed import Client, LocalCluster, wait

    import fastattn
    import fastattn.dask

    B, H, L, S, E = shape
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, H, L, E), dtype=np.float32).astype(dtype)
    k, v = (rng.standard_normal((B, H, S, E), dtype=np.float32).astype(dtype) for _ in "kv")
    want = fastattn.attention(q, k, v, causal=causal)

    def inputs(tag):
        """The inputs as Dask arrays under names of their own: a run never finds the results
        of an earlier one still held by the cluster (graph keys are names, not contents)."""
        return [da.from_array(x, chunks=(1, H, n, E), name=f"bench-{x_name}-{tag}")
                for x, x_name, n in ((q, "q", q_chunk), (k, "k", k_chunk), (v, "v", k_chunk))]

    configs, notes = {}, {}
    for threads in (1, 2):
        configs[f"in memory, {threads} thread{'s' * (threads > 1)}"] = (
            lambda i, threads=threads: _timed(
                lambda: fastattn.attention(q, k, v, causal=causal, num_threads=threads)))

    with contextlib.ExitStack() as stack:
        for n in workers:
            cluster = stack.enter_context(LocalCluster(
                n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                dashboard_address=None, silence_logs=40))
            client = stack.enter_context(Client(cluster, set_as_default=False))
            label = f"dask, {n} worker{'s' * (n > 1)}"
            out = fastattn.dask.attention(*inputs("check"), causal=causal)
            tasks = sum(len(layer) for name, layer in out.dask.layers.items()
                        if name.startswith("fastattn-partial-"))
            got = client.compute(out, sync=True)  # also the warm-up: workers import fastattn
            err = float(np.abs(got.astype(np.float64) - want).max())

            def from_numpy(i, client=client, n=n):
                return _timed(lambda: client.compute(
                    fastattn.dask.attention(*inputs(f"np{n}-{i}"), causal=causal), sync=True))

            def resident(i, client=client, n=n):
                with client.as_current():  # wait() looks for the current client
                    arrays = client.persist(inputs(f"res{n}-{i}"))
                    wait(arrays)

                    def go():
                        wait(client.persist(fastattn.dask.attention(*arrays, causal=causal)))

                    return _timed(go)

            configs[f"{label}, from NumPy"] = from_numpy
            notes[f"{label}, from NumPy"] = f"{tasks} kernel tasks; max |diff| {err:.1e}"
            configs[f"{label}, resident"] = resident

        times = {name: [] for name in configs}
        with warnings.catch_warnings():
            # "Sending large graph": shipping NumPy data in the graph is what "from NumPy" times.
            warnings.filterwarnings("ignore", message="Sending large graph")
            for i in range(repeat):
                for name, fn in configs.items():
                    times[name].append(fn(i))
    return [(name, min(t), notes.get(name, "")) for name, t in times.items()]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="4,8,2048,2048,64", help="B,H,L,S,E")
    parser.add_argument("--q-chunk", type=int, default=1024)
    parser.add_argument("--k-chunk", type=int, default=512)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    a = parser.parse_args(argv)
    shape = tuple(int(n) for n in a.shape.split(","))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sending large graph")
        rows = run(shape, a.q_chunk, a.k_chunk, a.causal,
                   tuple(int(n) for n in a.workers.split(",")), a.repeat, a.dtype)
    print(f"(B, H, L, S, E) = {shape} {a.dtype}{', causal' if a.causal else ''}; chunks: "
          f"batch 1, queries {a.q_chunk}, keys {a.k_chunk}; best of {a.repeat} rounds")
    base = rows[0][1]
    print("| run | time (s) | speed vs in memory, 1 thread | note |\n|---|---|---|---|")
    for what, t, note in rows:
        print(f"| {what} | {t:.3f} | {base / t:.2f}x | {note} |")


if __name__ == "__main__":
    main()
