# cython: language_level=3, boundscheck=False, wraparound=False
"""The compiled kernel: converts Python values to a ``fastattn::Problem`` and runs it without the GIL.

Nothing here checks NumPy semantics; ``fastattn.backends.cpu`` prepares every argument.
"""

from cpython.buffer cimport PyBUF_STRIDES, PyBuffer_Release, PyObject_GetBuffer
from cpython.exc cimport PyErr_CheckSignals
from cpython.pythread cimport PyThread_get_thread_ident
from cpython.ref cimport Py_DECREF, Py_INCREF, PyObject
from libc.math cimport sqrt
from libc.stdint cimport int64_t, uintptr_t
from libcpp cimport bool as cbool
from libcpp.string cimport string
from libcpp.vector cimport vector


cdef extern from "problem.hpp" namespace "fastattn":
    # The one problem struct of csrc/problem.hpp (its comments say what each field is): the
    # fields the binding sets; those the dispatcher owns are not declared here.
    cdef enum class DType "fastattn::DType":
        kFloat32 "fastattn::DType::kFloat32"
        kFloat64 "fastattn::DType::kFloat64"

    cdef enum class Storage "fastattn::Storage":
        kSame "fastattn::Storage::kSame"
        kFloat16 "fastattn::Storage::kFloat16"
        kBFloat16 "fastattn::Storage::kBFloat16"

    cdef enum class MaskKind "fastattn::MaskKind":
        kNone "fastattn::MaskKind::kNone"
        kBool "fastattn::MaskKind::kBool"
        kAdditive "fastattn::MaskKind::kAdditive"

    const int kMaxBatchDims "fastattn::kMaxBatchDims"
    const int64_t kNoBound "fastattn::kNoBound"

    cdef cppclass StridedView "fastattn::StridedView":
        const void* data
        int64_t batch_strides[64]
        int64_t row_stride
        int64_t col_stride

    cdef cppclass CProblem "fastattn::Problem":
        DType dtype
        Storage storage
        int n_batch_dims
        int64_t batch_shape[64]
        int64_t L, S, E, Ev
        StridedView q, k, v
        int64_t kv_group
        MaskKind mask_kind
        StridedView mask
        int64_t band_lo, band_hi, offset
        double scale, softcap
        StridedView alibi, kv_lengths, sinks, diag_shift
        const int* block_table
        int64_t block_table_stride, page_size
        int num_splits
        StridedView out, weights, lse
        int num_threads
        int (*interrupt_poll)(void*) noexcept nogil
        void* interrupt_ctx
        StridedView dout, dq, dk, dv
        cbool grads_bf16

cdef extern from "attention.hpp" namespace "fastattn":
    const int kOutputNonFinite "fastattn::kOutputNonFinite"

    int c_attention "fastattn::attention"(CProblem& p) except + nogil
    int c_attention_backward "fastattn::attention_backward"(CProblem& p) except + nogil
    void c_exp2_f32 "fastattn::exp2<float>"(const float* x, float* y, int64_t n) except + nogil
    void c_exp2_f64 "fastattn::exp2<double>"(const double* x, double* y, int64_t n) except + nogil
    string c_active_isa "fastattn::active_isa"() except +
    string c_bfloat16_tiles "fastattn::bfloat16_tiles"() except +
    string c_amx_status "fastattn::amx_status"() except +
    vector[string] c_available_isas "fastattn::available_isas"() except +
    void c_set_isa "fastattn::set_isa"(const string& name) except +
    cbool c_has_openmp "fastattn::has_openmp"()

cdef extern from "thread_pool.hpp" namespace "fastattn":
    int c_available_cores "fastattn::available_cores"()

cdef extern from "attention.hpp" namespace "fastattn":
    int c_default_threads "fastattn::default_threads"()


cdef void _fill(StridedView& op, object array, Py_ssize_t n_batch, int axes=2) except *:
    # The buffer protocol gives the address, shape and strides without NumPy's C API; the caller
    # keeps `array` alive. `axes`: how many of the operand's two matrix axes the array has (2;
    # 1 for lse, (..., L); 0 for per-batch-entry arrays), the others unit axes. Axes the array
    # lacks, or holds once (size 1), broadcast: stride 0.
    cdef Py_buffer view
    # Strides without the format: the dtype was checked by the caller, and NumPy builds a
    # format string for every request that asks for one (a tenth of a tiny call's core time).
    PyObject_GetBuffer(array, &view, PyBUF_STRIDES)
    cdef Py_ssize_t pad = n_batch + axes - view.ndim
    cdef Py_ssize_t d, i
    cdef int64_t stride
    try:
        if pad < 0:
            raise ValueError("operand has more axes than the batch shape")
        op.data = view.buf
        for d in range(n_batch + 2):
            stride = 0
            i = d - pad
            if 0 <= i < view.ndim and view.shape[i] != 1:
                stride = view.strides[i] // view.itemsize
            if d < n_batch:
                op.batch_strides[d] = stride
            elif d == n_batch:
                op.row_stride = stride
            else:
                op.col_stride = stride
    finally:
        PyBuffer_Release(&view)


import os as _os
import threading as _threading

import numpy as _np


# --- Ctrl-C during a long call --------------------------------------------------------------
# Python runs signal handlers only on its main thread, between bytecodes: a call that spends
# seconds in the kernel would hear Ctrl-C only when it returns. So a call made on the main
# thread hands the kernel _check_signals, which the kernel runs on this thread about every 20 ms
# (csrc/thread_pool.hpp): it runs the pending handlers, and one that raises (Ctrl-C's raises
# KeyboardInterrupt) stops the call, whose caller then raises that exception. Other threads are
# not polled (their signals are the main thread's to handle) and pay nothing.

cdef struct _Interrupt:
    PyObject* error  # the exception a signal handler raised (a reference), or NULL


cdef int _check_signals(void* ctx) noexcept nogil:
    cdef _Interrupt* st = <_Interrupt*>ctx
    with gil:
        try:
            PyErr_CheckSignals()
        except BaseException as e:
            Py_INCREF(e)
            st.error = <PyObject*>e
            return 1
    return 0


cdef unsigned long _main_thread = <unsigned long>_threading.main_thread().ident


def _after_fork_in_child():
    # A child forked from another thread has that thread as its main thread.
    global _main_thread
    _main_thread = <unsigned long>_threading.main_thread().ident


if hasattr(_os, "register_at_fork"):
    _os.register_at_fork(after_in_child=_after_fork_in_child)


cdef inline void _watch(CProblem& p, _Interrupt* st) noexcept:
    st.error = NULL
    if <unsigned long>PyThread_get_thread_ident() == _main_thread:
        p.interrupt_poll = _check_signals
        p.interrupt_ctx = st


cdef int _raise_if_interrupted(_Interrupt* st) except -1:
    # After the kernel returned (the GIL held again): the handler's exception, if one stopped it.
    if st.error == NULL:
        return 0
    error = <object>st.error
    Py_DECREF(error)  # the reference _check_signals took; `error` holds its own
    st.error = NULL
    raise error


NO_BOUND = kNoBound
OUTPUT_NONFINITE = kOutputNonFinite
# NumPy's descriptors of builtin types are singletons: `a.dtype is _F32` is an identity test.
_F32, _F64, _F16 = _np.dtype(_np.float32), _np.dtype(_np.float64), _np.dtype(_np.float16)
_ndarray, _empty = _np.ndarray, _np.empty


cdef inline bint _plain_view(Py_buffer* view, Py_ssize_t itemsize):
    # Element strides exist (no stride that splits an item) and the data is aligned to items.
    cdef Py_ssize_t d
    if <uintptr_t>view.buf % itemsize:
        return False
    for d in range(view.ndim):
        if view.strides[d] % itemsize:
            return False
    return True


cdef void _fill_view(StridedView& op, Py_buffer* view, Py_ssize_t n_batch):
    cdef Py_ssize_t d
    op.data = view.buf
    for d in range(n_batch):
        op.batch_strides[d] = 0 if view.shape[d] == 1 else view.strides[d] // view.itemsize
    op.row_stride = 0 if view.shape[n_batch] == 1 else view.strides[n_batch] // view.itemsize
    op.col_stride = 0 if view.shape[n_batch + 1] == 1 else view.strides[n_batch + 1] // view.itemsize


def attention_plain(q, k, v, causal, scale, num_threads):
    """The common call at C level: q, k and v NumPy arrays of one dtype (float32 or float64),
    the same batch shape, no mask nor any other option. Returns the output, or None when the
    call is not one of these (the caller then takes the general path, which checks and
    explains everything): a tiny call spends more time in Python's checks than in the kernel.
    """
    if type(q) is not _ndarray or type(k) is not _ndarray or type(v) is not _ndarray:
        return None
    dtype = q.dtype
    if not _plain_call(q, k, v, causal, scale, num_threads, _F32, _F64):
        return None
    cdef Py_buffer bq, bk, bv
    cdef CProblem p
    cdef Py_ssize_t d, nb, n_items = 1
    PyObject_GetBuffer(q, &bq, PyBUF_STRIDES)
    try:
        PyObject_GetBuffer(k, &bk, PyBUF_STRIDES)
        try:
            PyObject_GetBuffer(v, &bv, PyBUF_STRIDES)
            try:
                nb = bq.ndim - 2
                if nb < 0 or nb > kMaxBatchDims or bk.ndim != bq.ndim or bv.ndim != bq.ndim:
                    return None
                for d in range(nb):
                    if bk.shape[d] != bq.shape[d] or bv.shape[d] != bq.shape[d]:
                        return None
                    n_items *= bq.shape[d]
                p.L, p.E = bq.shape[nb], bq.shape[nb + 1]
                p.S, p.Ev = bk.shape[nb], bv.shape[nb + 1]
                if bk.shape[nb + 1] != p.E or bv.shape[nb] != p.S:
                    return None
                if n_items == 0 or p.L == 0 or p.S == 0 or p.E == 0 or p.Ev == 0:
                    return None  # empty problems: the general path
                if not (_plain_view(&bq, bq.itemsize) and _plain_view(&bk, bq.itemsize)
                        and _plain_view(&bv, bq.itemsize)):
                    return None
                p.n_batch_dims = nb
                for d in range(nb):
                    p.batch_shape[d] = bq.shape[d]
                _fill_view(p.q, &bq, nb)
                _fill_view(p.k, &bk, nb)
                _fill_view(p.v, &bv, nb)
                return _run_plain(p, q.shape[:nb], dtype, causal, scale, num_threads)
            finally:
                PyBuffer_Release(&bv)
        finally:
            PyBuffer_Release(&bk)
    finally:
        PyBuffer_Release(&bq)


cdef inline bint _plain_call(q, k, v, causal, scale, num_threads, f32, f64):
    # Whether the arguments are those of the common call: q, k and v of one dtype, f32 or f64,
    # and options of exactly the types the general path would turn them into.
    dtype = q.dtype
    if (dtype is not f32 and dtype is not f64) or k.dtype is not dtype or v.dtype is not dtype:
        return False
    if causal is not True and causal is not False:
        return False
    if num_threads is not None and (type(num_threads) is not int or num_threads < 1):
        return False
    return scale is None or type(scale) is float


cdef object _run_plain(CProblem& p, tuple batch, dtype, causal, scale, num_threads):
    # The rest of a checked common call: the output, the options, the kernel without the GIL.
    out = _empty(batch + (p.L, p.Ev), dtype)
    p.dtype = DType.kFloat64 if dtype is _F64 else DType.kFloat32
    _fill(p.out, out, len(batch))
    p.mask_kind = MaskKind.kNone
    p.band_lo = -kNoBound
    p.band_hi = 0 if causal else kNoBound
    p.scale = 1.0 / sqrt(<double>p.E) if scale is None else <double>scale
    p.num_threads = 0 if num_threads is None else num_threads
    cdef _Interrupt st
    cdef int flags
    _watch(p, &st)
    with nogil:
        flags = c_attention(p)
    _raise_if_interrupted(&st)
    if flags & kOutputNonFinite:
        return None  # the general path runs it again, v scaled down where that helps (backends/cpu.py)
    return out


cdef bint _fill_tensor(StridedView& op, t, Py_ssize_t itemsize, shape, Py_ssize_t nb) except -1:
    # A tensor's address and element strides (size-1 axes broadcast: stride 0), from its
    # data_ptr() and stride(); False when the address is not aligned to its items.
    cdef uintptr_t ptr = t.data_ptr()
    cdef tuple strides = t.stride()
    cdef Py_ssize_t d
    if ptr % itemsize:
        return False
    op.data = <const void*>ptr
    for d in range(nb):
        op.batch_strides[d] = 0 if shape[d] == 1 else strides[d]
    op.row_stride = 0 if shape[nb] == 1 else strides[nb]
    op.col_stride = 0 if shape[nb + 1] == 1 else strides[nb + 1]
    return True


def attention_plain_tensors(q, k, v, causal, scale, num_threads, f32, f64):
    """attention_plain for CPU tensors (their dtypes f32 and f64, e.g. torch.float32 and
    torch.float64; the caller checked that they are plain CPU tensors needing no gradient):
    read through data_ptr() and stride(), never converted. Returns the output as a NumPy array,
    or None (the caller then takes the general path)."""
    if not _plain_call(q, k, v, causal, scale, num_threads, f32, f64):
        return None
    tdtype = q.dtype
    # torch.Size is a tuple; indexed, not sliced (a slice of it is a new Size, slow to build)
    cdef tuple sq = tuple(q.shape)
    sk, sv = k.shape, v.shape
    cdef Py_ssize_t nd = len(sq), nb = nd - 2, d, itemsize = 8 if tdtype is f64 else 4
    cdef CProblem p
    if nb < 0 or nb > kMaxBatchDims or len(sk) != nd or len(sv) != nd:
        return None
    p.L, p.E, p.S, p.Ev = sq[nb], sq[nb + 1], sk[nb], sv[nb + 1]
    if sk[nb + 1] != p.E or sv[nb] != p.S or p.L == 0 or p.S == 0 or p.E == 0 or p.Ev == 0:
        return None
    p.n_batch_dims = nb
    for d in range(nb):
        if sq[d] == 0 or sk[d] != sq[d] or sv[d] != sq[d]:
            return None  # broadcasting and empty problems: the general path
        p.batch_shape[d] = sq[d]
    if not (_fill_tensor(p.q, q, itemsize, sq, nb) and _fill_tensor(p.k, k, itemsize, sk, nb)
            and _fill_tensor(p.v, v, itemsize, sv, nb)):
        return None
    return _run_plain(p, sq[:nb], _F64 if tdtype is f64 else _F32, causal, scale, num_threads)
cdef Storage _storage_of(dtype) except *:
    # q's dtype (k's and v's are the same): in the compute dtype, or 16-bit of a float32 problem.
    # == rather than `is`: a native dtype may be another instance (a byte-swapped one is not
    # equal, and the caller made every array native)
    if dtype == _F32 or dtype == _F64:
        return Storage.kSame
    if dtype == _F16:
        return Storage.kFloat16
    if dtype.name == "bfloat16":
        return Storage.kBFloat16
    raise TypeError(f"the kernel does not read {dtype}")


cdef class Problem:
    """One problem of the compiled kernel (csrc/problem.hpp's ``Problem``), built by keyword:
    the arrays, whose dtypes and shapes ``fastattn._validate`` checked, and the options.

    Sizes come from the arrays: q ``(..., L, E)``, k ``(..., S, E)``, v ``(..., S, Ev)`` and the
    output ``out`` ``(*batch, L, Ev)``, whose leading axes are the broadcast batch shape every
    other array broadcasts against. The storage comes from q's dtype (k, v, and in the backward
    pass out and dout, stored alike: the compute dtype, float16 or bfloat16, which the kernel
    reads, packs or widens as it needs), the compute dtype from out's (float32 or float64).
    ``lse`` is ``(..., L)``; ``alibi``, ``kv_lengths``, ``sinks`` and ``diag_shift`` (int64:
    moves each entry's diagonal and band by that many keys) have batch axes only; a bool
    ``mask`` removes keys, another adds to the scores. ``band_lo``/``band_hi``: query i sees
    keys i + band_lo .. i + band_hi (``NO_BOUND``: open). ``block_table`` (int32, (B, pages)):
    k and v are paged, their first axis pages of ``page_size`` keys; the caller checked every
    page id below ``kv_lengths``, which it must give. ``num_splits``: key splits of a decode step
    (0: chosen). The backward pass reads ``dout`` and writes ``dq``, ``dk``, ``dv`` (zeroed, of
    the full batch shape), as bfloat16 when they are.
    """

    cdef CProblem c
    cdef tuple arrays  # every operand, alive as long as the problem that points into them

    def __init__(self, *, q, k, v, out, mask=None, weights=None, lse=None, alibi=None,
                 kv_lengths=None, sinks=None, diag_shift=None, block_table=None,
                 int64_t page_size=0, dout=None, dq=None, dk=None, dv=None,
                 int64_t band_lo=-kNoBound, int64_t band_hi=kNoBound, int64_t offset=0,
                 double scale=1.0, double softcap=0.0, int64_t kv_group=1,
                 int num_threads=0, int num_splits=0):
        cdef CProblem* p = &self.c
        batch = out.shape[:out.ndim - 2]
        cdef Py_ssize_t nb = len(batch), d
        if nb > kMaxBatchDims:
            raise ValueError("too many batch axes")
        self.arrays = (q, k, v, out, mask, weights, lse, alibi, kv_lengths, sinks, diag_shift,
                       block_table, dout, dq, dk, dv)
        p.dtype = DType.kFloat64 if out.dtype == _F64 else DType.kFloat32
        p.storage = _storage_of(q.dtype)
        if k.dtype != q.dtype or v.dtype != q.dtype:
            raise TypeError(f"q, k and v are stored alike, not as {q.dtype}, {k.dtype}, {v.dtype}")
        p.n_batch_dims = nb
        for d in range(nb):
            p.batch_shape[d] = batch[d]
        p.L = q.shape[q.ndim - 2]
        p.E = q.shape[q.ndim - 1]
        p.S = k.shape[k.ndim - 2]
        p.Ev = v.shape[v.ndim - 1]
        _fill(p.q, q, nb)
        _fill(p.k, k, nb)
        _fill(p.v, v, nb)
        _fill(p.out, out, nb)
        p.kv_group = kv_group
        p.mask_kind = (MaskKind.kNone if mask is None else
                       MaskKind.kBool if mask.dtype == _np.bool_ else MaskKind.kAdditive)
        p.band_lo, p.band_hi, p.offset = band_lo, band_hi, offset
        p.scale, p.softcap = scale, softcap
        p.num_threads = num_threads
        p.grads_bf16 = dq is not None and dq.dtype.name == "bfloat16"
        _fill_optional(p.mask, mask, nb)
        _fill_optional(p.weights, weights, nb)
        _fill_optional(p.lse, lse, nb, 1)
        _fill_optional(p.alibi, alibi, nb, 0)
        _fill_optional(p.kv_lengths, kv_lengths, nb, 0)
        _fill_optional(p.sinks, sinks, nb, 0)
        _fill_optional(p.diag_shift, diag_shift, nb, 0)
        p.num_splits = num_splits
        if block_table is not None:
            _fill_pages(self.c, block_table, page_size)
        _fill_optional(p.dout, dout, nb)
        _fill_optional(p.dq, dq, nb)
        _fill_optional(p.dk, dk, nb)
        _fill_optional(p.dv, dv, nb)


cdef void _fill_pages(CProblem& p, block_table, int64_t page_size) except *:
    # A C-contiguous int32 (B, pages) table, as the caller made it. The keys a sequence can
    # hold, S, are its pages' (k's row axis is one page).
    if block_table.dtype != _np.int32 or block_table.ndim != 2 or not block_table.flags.c_contiguous:
        raise TypeError("block_table must be a C-contiguous 2-D int32 array")
    cdef const int[:, ::1] table = block_table
    p.block_table = &table[0, 0] if table.shape[0] and table.shape[1] else NULL
    p.block_table_stride = table.shape[1]
    p.page_size = page_size
    p.S = table.shape[1] * page_size


cdef inline void _fill_optional(StridedView& op, array, Py_ssize_t nb, int axes=2) except *:
    if array is not None:
        _fill(op, array, nb, axes)


def attention(Problem problem):
    """Runs the fused kernel on the problem, without the GIL. Returns flags: ``OUTPUT_NONFINITE``
    when an output is inf or NaN before normalization (the sum of weights times values
    overflowed, or the inputs hold an inf or a NaN), else 0."""
    cdef _Interrupt st
    cdef int flags
    _watch(problem.c, &st)
    with nogil:
        flags = c_attention(problem.c)
    _raise_if_interrupted(&st)
    return flags & kOutputNonFinite


def attention_backward(Problem problem):
    """The fused backward pass: writes the problem's dq, dk and dv for its upstream gradient
    ``dout``, from the forward's ``out`` and ``lse``."""
    cdef _Interrupt st
    _watch(problem.c, &st)
    with nogil:
        c_attention_backward(problem.c)
    _raise_if_interrupted(&st)


def exp2(x):
    """2**x by the softmax's vectorized exp2 on the selected path; x: contiguous float32/float64."""
    cdef const float[::1] xf
    cdef float[::1] yf
    cdef const double[::1] xd
    cdef double[::1] yd
    import numpy as np

    x = np.ascontiguousarray(x)
    y = np.empty_like(x)
    if x.dtype == np.float32:
        xf, yf = x.reshape(-1), y.reshape(-1)
        c_exp2_f32(&xf[0] if xf.shape[0] else NULL, &yf[0] if yf.shape[0] else NULL, xf.shape[0])
    elif x.dtype == np.float64:
        xd, yd = x.reshape(-1), y.reshape(-1)
        c_exp2_f64(&xd[0] if xd.shape[0] else NULL, &yd[0] if yd.shape[0] else NULL, xd.shape[0])
    else:
        raise TypeError(f"exp2 takes float32 or float64, not {x.dtype}")
    return y


def active_isa():
    """The instruction set the kernel uses now: 'amx', 'avx512bf16', 'avx512', 'avx2' or
    'baseline'."""
    return c_active_isa().decode()


def bfloat16_tiles():
    """How bfloat16 tiles run now: 'amx', 'pairs' (vdpbf16ps) or 'float32' (widened once)."""
    return c_bfloat16_tiles().decode()


def amx_status():
    """Whether the amx variant runs here, and if not why, in words."""
    return c_amx_status().decode()


def available_isas():
    """Instruction sets this build has a kernel for and this CPU runs, best first."""
    return [name.decode() for name in c_available_isas()]


def set_isa(name):
    """Forces a kernel variant for this process ('' or None: automatic, or $FASTATTN_ISA)."""
    c_set_isa((name or "").encode())


def has_openmp():
    """Whether the build reads OpenMP's settings (OMP_NUM_THREADS, threadpoolctl's limits) for
    its default thread count; the threads themselves are fastattn's own pool."""
    return c_has_openmp()


def default_threads():
    """Threads a call with num_threads=None uses: OMP_NUM_THREADS and threadpoolctl's limits
    apply, and never more than the cores this process may run on."""
    return c_default_threads()


def available_cores():
    """The cores this process may run on (its CPU affinity): no call runs more threads."""
    return c_available_cores()
