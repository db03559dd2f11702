"""The implementations the benchmarks time, and the registry of the peers fastattn is measured
against.

Each implementation is an :class:`Adapter` registered by name with :func:`register`: fastattn
itself, its float64 reference and plain NumPy (timed by ``pytest bench/``), and the peers of the
``python -m fastattn bench`` table, one column each in the order of registration:

* ``torch``: ``torch.nn.functional.scaled_dot_product_attention`` on tensors made with
  ``torch.from_numpy`` before timing.
* ``ort``: ONNX Runtime's ``com.microsoft.MultiHeadAttention`` in a one-node model built in
  memory; inputs laid out as ``(B, L, H*E)`` before timing.
* ``openvino``: OpenVINO's ``ScaledDotProductAttention`` (opset 13) in a one-node model
  compiled for the case on the CPU plugin, float32 and bfloat16.

A peer is available when the packages it names in ``modules`` import (:meth:`Adapter.missing`);
one that is not shows as ``absent``, and one that lacks a case (:meth:`Adapter.supports`) as
``-``. A new peer is an Adapter subclass and one ``register(...)`` line.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import numpy as np

from .. import __version__, reference
from .._api import attention
from .cases import Case, Inputs


class Runner(NamedTuple):
    """A prepared call (all conversions done) and how to turn its result into (B, H, L, Ev)."""

    call: Callable[[], Any]
    to_numpy: Callable[[Any], np.ndarray]


class Adapter:
    """How one implementation runs a case. Subclasses override :meth:`prepare`."""

    name = ""
    modules: tuple[str, ...] = ()  # the packages it needs, for "absent" and importorskip
    package = ""  # a peer's package, as the machine line names its version
    title = ""  # a peer's implementation, as the command line's help names it

    def missing(self) -> str | None:
        """None when usable, else why not (the ImportError's message)."""
        for module in self.modules:
            try:
                __import__(module)
            except (ImportError, OSError) as exc:  # OSError: a wheel whose libraries fail
                return str(exc)
        return None

    def version(self) -> str:
        return ""

    def supports(self, case: Case) -> bool:
        return True

    def prepare(self, inp: Inputs, case: Case, threads: int) -> Runner:
        raise NotImplementedError


class FastattnAdapter(Adapter):
    name = "fastattn"

    def version(self) -> str:
        return __version__

    def prepare(self, inp, case, threads):
        q, k, v, mask = inp.q, inp.k, inp.v, inp.mask

        def call():
            return attention(q, k, v, mask=mask, causal=case.causal, enable_gqa=case.gqa,
                             num_threads=threads)

        return Runner(call, np.asarray)


class ReferenceAdapter(Adapter):
    """fastattn's float64 NumPy oracle (builds the whole L x S score matrix)."""

    name = "reference"

    def prepare(self, inp, case, threads):
        q, k, v, mask = inp.q, inp.k, inp.v, inp.mask

        def call():
            return reference.attention(q, k, v, mask=mask, causal=case.causal,
                                       enable_gqa=case.gqa)

        return Runner(call, np.asarray)


class NumpyAdapter(Adapter):
    """The textbook formula in plain NumPy, in the inputs' dtype: what users write by hand."""

    name = "numpy"

    def prepare(self, inp, case, threads):
        q, k, v = inp.q, inp.k, inp.v
        if case.gqa:  # the usual hand-written GQA: repeat K and V (done before timing)
            k = np.repeat(k, case.H // case.kv_heads, axis=1)
            v = np.repeat(v, case.H // case.kv_heads, axis=1)
        keep = inp.mask
        if case.causal:
            keep = np.tril(np.ones((case.L, case.S), dtype=bool))
        scale = q.dtype.type(1.0 / math.sqrt(case.E))

        def call():
            scores = (q * scale) @ k.swapaxes(-1, -2)
            if keep is not None:
                scores = np.where(keep, scores, -np.inf)
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            return scores @ v

        return Runner(call, np.asarray)


class TorchAdapter(Adapter):
    """PyTorch ``scaled_dot_product_attention`` on CPU tensors sharing the NumPy buffers."""

    name = "torch"
    modules = ("torch",)
    package = "torch"
    title = "PyTorch SDPA"

    def version(self):
        import torch

        return torch.__version__

    def prepare(self, inp, case, threads):
        import torch
        from torch.nn.functional import scaled_dot_product_attention as sdpa

        torch.set_num_threads(threads)
        q, k, v = (self.tensor(a) for a in (inp.q, inp.k, inp.v))
        mask = None if inp.mask is None else torch.from_numpy(inp.mask)
        kwargs = {"enable_gqa": True} if case.gqa else {}

        def call():  # no autograd: tensors from NumPy never require grad
            return sdpa(q, k, v, attn_mask=mask, is_causal=case.causal, **kwargs)

        # NumPy has no bfloat16: such outputs are compared in float32, the others as they are
        return Runner(call, lambda out: (out.float() if out.dtype == torch.bfloat16
                                         else out).numpy())

    @staticmethod
    def tensor(a: np.ndarray):
        """A tensor sharing the array's memory (bfloat16 through its bits)."""
        import torch

        if a.dtype.name == "bfloat16":
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)


class OrtAdapter(Adapter):
    """ONNX Runtime's ``com.microsoft.MultiHeadAttention`` (its CPU kernel is MLAS's).

    Semantics checked against fastattn: ``unidirectional=1`` equals a top-left causal mask
    only when L == S (with L != S it matches neither alignment, so such cases are declined);
    ``key_padding_mask`` of shape (B,) int32 is the number of valid keys per batch
    (mask type "1D key sequence length"); masked scores get ``mask_filter_value`` (-10000)
    added rather than -inf, so a batch with no valid key averages V instead of giving 0.
    Causal and padded calls leave MLAS's flash kernel for the path that builds the scores.

    Inputs are ``(B, L, H*E)``, except K and V of memory-bound cases (decode), which are fed as
    ``(B, H, S, E)``, the layout of a KV cache: ORT then reads the NumPy arrays in place, where
    the packed layout costs a 4 GB copy before timing and a 4 GB transpose inside every call
    (2.6x slower, and 13 GB resident instead of 4).
    """

    name = "ort"
    modules = ("onnxruntime", "onnx")  # onnx builds the model
    package = "onnxruntime"
    title = "ONNX Runtime MultiHeadAttention"

    def version(self):
        import onnxruntime

        return onnxruntime.__version__

    def supports(self, case):
        return (case.dtype == "float32" and not case.gqa
                and (not case.causal or case.L == case.S))

    @staticmethod
    def kv_packed(case: Case) -> bool:
        """Whether K and V go in as (B, S, H*E) (else as (B, H, S, E))."""
        return not case.memory_bound

    @classmethod
    def session(cls, case: Case, threads: int):
        """An InferenceSession of a single MultiHeadAttention node, built in memory."""
        import onnxruntime as ort
        from onnx import TensorProto, helper

        packed = ["B", "len", case.H * case.E]
        kv_shape = packed if cls.kv_packed(case) else ["B", case.H, "S", case.E]
        inputs = [helper.make_tensor_value_info("query", TensorProto.FLOAT, packed)]
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, kv_shape)
                   for n in ("key", "value")]
        names = ["query", "key", "value"]
        if case.padding:  # input 3 (bias) is skipped with an empty name
            names += ["", "key_padding_mask"]
            inputs.append(helper.make_tensor_value_info("key_padding_mask", TensorProto.INT32,
                                                        ["B"]))
        attrs = {"num_heads": case.H}
        if case.causal:
            attrs["unidirectional"] = 1
        node = helper.make_node("MultiHeadAttention", names, ["output"],
                                domain="com.microsoft", **attrs)
        output = helper.make_tensor_value_info("output", TensorProto.FLOAT, None)
        graph = helper.make_graph([node], "mha", inputs, [output])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # ORT's idle workers otherwise spin for a while after each run, taking a core from
        # whichever implementation runs next (2x slower on 2 cores); ORT's own time is the same.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(model.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"])

    def prepare(self, inp, case, threads):
        sess = self.session(case, threads)

        def packed(a):  # (B, H, L, E) -> (B, L, H*E)
            return np.ascontiguousarray(a.transpose(0, 2, 1, 3).reshape(case.B, a.shape[2], -1))

        kv = packed if self.kv_packed(case) else np.ascontiguousarray
        feeds = {"query": packed(inp.q), "key": kv(inp.k), "value": kv(inp.v)}
        if case.padding:
            feeds["key_padding_mask"] = inp.lengths.astype(np.int32)

        def call():
            return sess.run(None, feeds)[0]

        def to_numpy(out):
            return out.reshape(case.B, case.L, case.H, case.E).transpose(0, 2, 1, 3)

        return Runner(call, to_numpy)


class OpenVinoAdapter(Adapter):
    """OpenVINO's fused ``ScaledDotProductAttention`` (opset 13) on its CPU plugin.

    A one-node model per case, compiled for its shapes with the inputs' precision as the
    inference precision: float32, and bfloat16 (parameters of type bf16 fed the arrays' bits,
    ``INFERENCE_PRECISION_HINT`` bf16). ``causal=True`` is the top-left causal mask, as
    PyTorch's ``is_causal``; the padding mask goes in as a boolean ``attention_mask`` (True =
    the key takes part). Grouped-query cases are declined (the op broadcasts k and v over
    heads only by NumPy rules), and so are float64 and float16 (no such inference precision
    on every CPU).
    """

    name = "openvino"
    modules = ("openvino",)
    package = "openvino"
    title = "OpenVINO ScaledDotProductAttention"

    def version(self):
        import openvino

        return openvino.__version__.split("-")[0]

    def supports(self, case):
        return case.dtype in ("float32", "bfloat16") and not case.gqa

    def prepare(self, inp, case, threads):
        import openvino as ov
        import openvino.opset13 as ops

        bf16 = case.dtype == "bfloat16"
        arrays = [inp.q, inp.k, inp.v] + ([] if inp.mask is None else [inp.mask])
        types = [ov.Type.bf16 if bf16 else ov.Type.f32] * 3 + [ov.Type.boolean]
        params = [ops.parameter(list(a.shape), t) for a, t in zip(arrays, types)]
        node = ops.scaled_dot_product_attention(*params, causal=case.causal)
        config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                  "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "bf16" if bf16
                  else "f32"}
        compiled = ov.Core().compile_model(ov.Model([node], params), "CPU", config)
        request = compiled.create_infer_request()
        for i, (a, t) in enumerate(zip(arrays, types)):
            tensor = ov.Tensor(t, list(a.shape))
            np.copyto(tensor.data.view(np.uint16) if t == ov.Type.bf16 else tensor.data,
                      a.view(np.uint16) if t == ov.Type.bf16 else a)
            request.set_input_tensor(i, tensor)

        def call():
            request.infer()
            return request.get_output_tensor(0)

        def to_numpy(out):
            data = np.array(out.data)
            if bf16:  # bfloat16 bits to float32
                return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
            return data

        return Runner(call, to_numpy)


#: Every implementation by name: fastattn, the reference, NumPy and the peers.
ADAPTERS: dict[str, Adapter] = {}
#: The peers' names, in the table's column order.
PEERS: list[str] = []


def register(adapter: Adapter, *, peer: bool = True) -> Adapter:
    """Adds an implementation under its name; a peer (the default) also gets a column of the
    forward table, a version in the machine line and a place in the ratio. Returns it."""
    ADAPTERS[adapter.name] = adapter
    if peer and adapter.name not in PEERS:
        PEERS.append(adapter.name)
    return adapter


def peers() -> tuple[str, ...]:
    """The registered peers' names, in column order."""
    return tuple(PEERS)


register(FastattnAdapter(), peer=False)
register(ReferenceAdapter(), peer=False)
register(NumpyAdapter(), peer=False)
register(TorchAdapter())
register(OrtAdapter())
register(OpenVinoAdapter())
