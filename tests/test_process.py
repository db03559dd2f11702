"""What a process does to fastattn: fork, Ctrl-C, absurd thread counts, idle threads.

Each scenario runs in a fresh interpreter with a timeout, so a hang (a forked child waiting for
threads that no longer exist) fails the test instead of stopping the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = [
    pytest.mark.skipif(not os.path.isdir("/proc/self/task") or not hasattr(os, "fork"),
                       reason="needs fork() and Linux /proc/self/task"),
    pytest.mark.native,  # the sanitizer build runs these (.ci/sanitize.sh)
]

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def run_script(script: str, *args: str, timeout: float = 240, env: dict | None = None) -> dict:
    """Runs ``script`` in a fresh interpreter; returns the JSON object it prints last."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "FASTATTN_"))}
    full.update(env or {})
    try:
        res = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], env=full,
                             capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the script hung (no answer in {timeout} s); stderr: {e.stderr!r}")
    assert res.returncode == 0, f"exit {res.returncode}; stderr:\n{res.stderr}"
    return json.loads(res.stdout.strip().splitlines()[-1])


# --- fork -------------------------------------------------------------------------------------

FORK_SCRIPT = """
    import hashlib, json, os, sys, threading, time
    import multiprocessing as mp
    import numpy as np

    mode = sys.argv[1]
    if mode.startswith("torch"):
        import torch
        a = torch.randn(512, 512)
        for _ in range(5):
            a = torch.tanh(a @ a)  # torch's own OpenMP threads ran in the parent
    import fastattn

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((4, 4, 256, 32), dtype=np.float32) for _ in range(3))
    mask = rng.random((256, 256)) < 0.8
    cores = len(os.sched_getaffinity(0))

    def tasks():
        return len(os.listdir("/proc/self/task"))

    def digest():
        # The C-level path and the general one; bits do not depend on the thread count here.
        plain = fastattn.attention(q, k, v, causal=True)
        out, lse = fastattn.attention(q, k, v, mask=mask, return_lse=True)
        return hashlib.sha256(b"".join(a.tobytes() for a in (plain, out, lse))).hexdigest()

    def compute(_=None):
        # What a child computed, and the threads it gained in its first multi-threaded calls
        # (its pool starts one per core beside the caller; a reused worker starts none).
        before = tasks()
        d = digest()
        return d, tasks() - before, fastattn._core.default_threads()

    # The parent uses fastattn's threads before it forks, except in "torch-only" (it used only
    # torch's): there the parent computes the expected bits after its children are done.
    want = None if mode == "torch-only" else digest()

    results = []
    if mode in ("os.fork", "torch", "torch-only", "during-call"):
        busy = None
        if mode == "during-call":  # another thread is inside a long multi-threaded call
            big = rng.standard_normal((64, 1024, 64), dtype=np.float32)
            busy = threading.Thread(target=fastattn.attention, args=(big, big, big))
            busy.start()
            time.sleep(0.05)
        parent_end, child_end = mp.Pipe(duplex=False)
        pid = os.fork()
        if pid == 0:
            try:
                child_end.send(compute())
            finally:
                os._exit(0)
        child_end.close()
        results.append(parent_end.recv())
        os.waitpid(pid, 0)
        if busy is not None:
            busy.join()
    elif mode == "multiprocessing":
        with mp.get_context("fork").Pool(2) as pool:
            results = pool.map(compute, range(4), chunksize=1)
    elif mode == "loader":
        # PyTorch DataLoader's pattern, without torch: forked workers take indices from a
        # queue and send back what they computed.
        ctx = mp.get_context("fork")
        index_q, data_q = ctx.Queue(), ctx.Queue()

        def worker(index_q, data_q):
            for i in iter(index_q.get, None):
                data_q.put((i, compute()))

        procs = [ctx.Process(target=worker, args=(index_q, data_q)) for _ in range(2)]
        for p in procs:
            p.start()
        for i in range(6):
            index_q.put(i)
        results = [data_q.get()[1] for _ in range(6)]
        for p in procs:
            index_q.put(None)
        for p in procs:
            p.join()
    elif mode == "torch-dataloader":
        import torch.utils.data as tud

        class Windows(tud.Dataset):
            def __len__(self):
                return 6

            def __getitem__(self, i):
                return compute()

        loader = tud.DataLoader(Windows(), batch_size=None, num_workers=2,
                                multiprocessing_context="fork")
        results = list(loader)
    if want is None:
        want = digest()
    print(json.dumps({"results": [[d == want, int(t), int(n)] for d, t, n in results],
                      "cores": cores}))
"""


FORK_MODES = ["os.fork", "multiprocessing", "loader", "during-call"]


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize(
    "mode",
    FORK_MODES + [pytest.param(m, marks=pytest.mark.torch)
                  for m in ("torch", "torch-only", "torch-dataloader")])
def test_forked_child_computes_with_all_its_cores(mode):
    if mode.startswith("torch") and not _torch_available():
        pytest.skip("needs torch (the 'torch' extra) for its OpenMP threads and DataLoader")
    got = run_script(FORK_SCRIPT, mode, timeout=180)
    results, cores = got["results"], got["cores"]
    assert results, got
    assert all(same for same, _, _ in results), f"a forked child's results differ: {results}"
    defaults = {default for _, _, default in results}
    if mode == "torch-dataloader":
        # DataLoader runs torch.set_num_threads(1) in its workers (so that N workers do not
        # run N x cores threads); where fastattn shares torch's OpenMP runtime (a source
        # build beside torch's wheel), it obeys that setting as it obeys threadpoolctl's.
        assert len(defaults) == 1 and defaults <= {1, cores}, results
    else:
        assert defaults == {cores}, results
    # The first call in each child started a thread per core beside the caller (a process that
    # already ran a multi-threaded call, a pool worker reused by map, starts none).
    assert max(t for _, t, _ in results) == defaults.pop() - 1, results


# --- Ctrl-C -----------------------------------------------------------------------------------

INTERRUPT_SCRIPT = """
    import ctypes, json, os, signal, sys, threading, time
    import numpy as np
    import fastattn

    kind, threads = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(0)

    def problem(n):
        # n batch entries of the kind's shape; broadcast operands keep memory small
        if kind == "forward":  # the tile kernel
            q = rng.standard_normal((n, 1024, 64), dtype=np.float32)
            return lambda: fastattn.attention(q, q, q, num_threads=threads)
        if kind == "forward-options":  # the general path: mask, softcap, lse
            q = rng.standard_normal((n, 1024, 64), dtype=np.float32)
            mask = rng.random((1024, 1024)) < 0.9
            return lambda: fastattn.attention(q, q, q, mask=mask, softcap=30.0, return_lse=True,
                                              num_threads=threads)
        if kind == "decode":  # the row kernel: one query per entry, 8192 shared keys
            q = rng.standard_normal((n, 1, 128), dtype=np.float32)
            kv = rng.standard_normal((1, 8192, 128), dtype=np.float32)
            return lambda: fastattn.attention(q, kv, kv, num_threads=threads)
        if kind == "backward":
            q = rng.standard_normal((n, 1024, 64), dtype=np.float32)
            out, lse = fastattn.attention(q[:1], q[:1], q[:1], return_lse=True)
            out, lse = np.repeat(out, n, axis=0), np.repeat(lse, n, axis=0)
            return lambda: fastattn.attention_backward(q, q, q, out, lse, out,
                                                       num_threads=threads)
        raise ValueError(kind)

    # As many entries as make the call last ~1.5 s: an interrupt heard only at its end is late.
    n = 1
    while True:
        call = problem(n)
        t0 = time.perf_counter()
        call()
        took = time.perf_counter() - t0
        if took > 0.3:
            n = int(n * 1.5 / took) + 1
            break
        n *= 4
    call = problem(n)

    libc = ctypes.CDLL(None)

    def rss():
        # glibc keeps freed heap memory (the interrupted calls' gradients, ~10 MB each, once its
        # mmap threshold has risen to their size) until trimmed: trim it, so that what stays is
        # what nothing freed.
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def interrupted_call():
        # Ctrl-C 0.3 s into the call; returns the seconds from the signal to KeyboardInterrupt.
        sent = []

        def fire():
            time.sleep(0.3)
            sent.append(time.perf_counter())
            os.kill(os.getpid(), signal.SIGINT)

        timer = threading.Thread(target=fire)
        timer.start()
        try:
            call()
        except KeyboardInterrupt:
            late = time.perf_counter() - sent[0]
        else:
            late = None
        timer.join()
        return late

    latencies = [interrupted_call()]  # then the pool and buffers exist: measure from here
    base = rss()
    latencies += [interrupted_call() for _ in range(3)]  # every Ctrl-C interrupts its call
    grown = rss() - base
    # No thread keeps computing after the exception: the process is idle.
    cpu = time.process_time()
    time.sleep(0.3)
    idle_cpu = time.process_time() - cpu

    # A handler that does not raise is run during the call (within the poll interval), and the
    # call goes on to the right result, as Python retries a system call (PEP 475).
    heard = []
    signal.signal(signal.SIGINT, lambda *a: heard.append(time.perf_counter()))
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
    t0 = time.perf_counter()
    call()
    done = time.perf_counter()
    # Heard while the call still had work left: a handler run only when the call returns is heard
    # at its end. 0.1 s is five poll intervals; the call lasts ~1.5 s (less on a machine that was
    # loaded while the calibration above timed it).
    heard_at = heard[0] - t0 if heard else None
    heard_during = heard_at is not None and heard_at < done - t0 - 0.1

    # And the next calls are right.
    x = rng.standard_normal((2, 3, 100, 16))
    err = float(np.abs(fastattn.attention(x, x, x, causal=True)
                       - fastattn.reference.attention(x, x, x, causal=True)).max())
    print(json.dumps(dict(call_s=done - t0, heard_at=heard_at, latencies=latencies,
                          rss_growth=grown, idle_cpu=idle_cpu, heard_during=heard_during,
                          err=err)))
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["forward", "forward-options", "decode", "backward"])
@pytest.mark.parametrize("threads", [1, 2])
def test_ctrl_c_interrupts_a_long_call(kind, threads):
    got = run_script(INTERRUPT_SCRIPT, kind, str(threads), timeout=300)
    # Every signal interrupted its call, far before the call's end (~1.5 s): the poll runs every
    # 20 ms; 0.25 s leaves room for a loaded machine.
    assert all(late is not None for late in got["latencies"]), got
    assert max(got["latencies"]) < 0.25, got
    assert got["rss_growth"] < 16 * 2**20, got  # interrupted calls free what they took
    assert got["idle_cpu"] < 0.05, got  # no thread still running after the exception
    assert got["heard_during"], got
    assert got["err"] < 1e-12, got


# --- thread counts ----------------------------------------------------------------------------

THREADS_SCRIPT = """
    import json, os, sys
    import numpy as np
    import fastattn

    q = np.zeros((40000, 1, 4), np.float32)
    q[:, 0, 0] = 1
    n = None if sys.argv[1] == "None" else int(sys.argv[1])
    out = fastattn.attention(q, q, q, num_threads=n)
    print(json.dumps(dict(threads=len(os.listdir("/proc/self/task")),
                          right=bool(np.array_equal(out, q)))))
"""


@pytest.mark.parametrize("num_threads,env", [("40000", {}), ("None", {"OMP_NUM_THREADS": "40000"}),
                                             ("20000", {})])
def test_thread_counts_past_the_cores_are_clamped(num_threads, env):
    # libgomp asked for 40,000 threads printed "Thread creation failed" and ended the process;
    # 20,000 left 20,000 threads behind. A call runs at most one thread per core.
    got = run_script(THREADS_SCRIPT, num_threads, env=env, timeout=120)
    assert got["right"], got
    assert got["threads"] <= CORES + 1, got  # the caller and one pool thread per other core


SPAWN_FAILS_SCRIPT = """
    import json, os, resource
    import numpy as np
    import fastattn

    q = np.random.default_rng(0).standard_normal((8, 256, 32), dtype=np.float32)
    want = fastattn.reference.attention(q, q, q)
    # No room for another thread's stack (8 MiB): creating the pool's threads fails.
    with open("/proc/self/statm") as f:
        size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    before = len(os.listdir("/proc/self/task"))  # the main thread, and NumPy's BLAS threads
    resource.setrlimit(resource.RLIMIT_AS, (size + 4 * 2**20, resource.RLIM_INFINITY))
    out = fastattn.attention(q, q, q, num_threads=2)
    err = float(np.abs(out - want).max())
    new = len(os.listdir("/proc/self/task")) - before
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    print(json.dumps(dict(err=err, new_threads=new)))
"""


@pytest.mark.skipif(CORES < 2, reason="needs 2 cores for a multi-threaded call")
@pytest.mark.skipif("asan" in os.environ.get("LD_PRELOAD", ""),
                    reason="AddressSanitizer maps terabytes of shadow memory: no address-space "
                           "limit can single out a thread's stack under it")
def test_a_thread_the_os_refuses_only_slows_the_call():
    got = run_script(SPAWN_FAILS_SCRIPT, timeout=120)
    assert got["new_threads"] == 0, got  # no thread could start: the caller did all the work
    assert got["err"] < 1e-5, got


# --- idle threads -----------------------------------------------------------------------------

IDLE_SCRIPT = """
    import json, os, sys, time
    import numpy as np
    if sys.argv[1] == "torch-first":
        import torch  # loads its OpenMP runtime before fastattn
        torch.ones(4) @ torch.ones(4)
    import fastattn

    def worker_ticks():
        main = str(os.getpid())
        total = 0
        for tid in os.listdir("/proc/self/task"):
            if tid == main:
                continue
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        return total

    q = np.random.default_rng(0).standard_normal((16, 512, 64), dtype=np.float32)
    for _ in range(20):
        fastattn.attention(q, q, q)
    before = worker_ticks()
    time.sleep(0.5)  # the next call is half a second away: the pool threads must not run
    print(json.dumps(dict(ticks=worker_ticks() - before, hz=os.sysconf("SC_CLK_TCK"))))
"""


@pytest.mark.parametrize(
    "order", ["fastattn-only", pytest.param("torch-first", marks=pytest.mark.torch)])
def test_idle_threads_give_their_cores_back(order):
    if order == "torch-first" and not _torch_available():
        pytest.skip("needs torch (the 'torch' extra) to load its OpenMP runtime first")
    got = run_script(IDLE_SCRIPT, order, timeout=120)
    # At most one clock tick (10 ms) of the half second: threads spin 50 us after a call, then
    # sleep, whatever the import order and with no environment variable.
    assert got["ticks"] <= 1, got
