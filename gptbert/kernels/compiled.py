"""``torch.compile`` in the kernels: the whole model's forward (``train.compile``), eager where that
fails, and ``CompiledOnCpu``, the one way a kernel compiles its row-wise maths for CPU training.

Compiling is worth it on GPUs, where inductor fuses the pointwise work between the matmuls; on a
CPU the hand-written kernels of this package are faster (measured: 0.87x of eager, first step
14-16 s). A compile that fails (no working C++/Triton toolchain, an op dynamo cannot trace) must not
end a run: the first failure is a warning naming the error and how long the attempt took, and the
model runs eagerly from then on. Under compilation the layer weighting takes the plain model's
sums, which dynamo traces and fuses (the buffered kernel keeps Python state between the forward and
the backward, a graph break at every block).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from common.errors import error_line
from common.storage import atomic_write_bytes, cache_root

from ..model import GPTBERT, LayerWeighting

log = logging.getLogger("gptbert")


class CompiledOnCpu:
    """``fn`` (row-wise maths: every tensor argument's first dimension is the same rows) as one
    inductor-compiled kernel forward and one backward for CPU training steps; ``eager`` (the same
    maths) everywhere else (inference, other devices, inside a model compiled as a whole), and
    where the compiler fails or its kernel is wrong on this CPU (a warning says so once).

    The first input is flattened to (rows, features) and only the row count is dynamic, in it and in
    every other tensor argument with those rows: micro-batch sizes vary from step to step, and one
    graph for all of them keeps a resumed run numerically equal to an uninterrupted one (every row is
    computed by the same code whatever the count). Fully dynamic shapes made slower code.

    Inductor generates different C++ for each CPU kind (AVX2, AVX-512, AMX), and a kernel right on
    one has been wrong on another, so the compiled kernel is trusted only after ``self_check`` has
    compared it with ``eager`` on this CPU, per input signature (dtypes, feature sizes, autocast),
    the verdict cached on disk per CPU kind and torch release (``KernelChecks``).
    """

    def __init__(self, fn, eager, what: str):
        self.fn, self.eager, self.what = fn, eager, what
        self.compiled = None  # None: not tried yet; False: the compiler failed here
        self.trusted: dict[str, bool] = {}  # input signature -> the self-check's verdict

    def __call__(self, x: torch.Tensor, *args):
        rows = x.numel() // max(x.size(-1), 1)
        if (self.compiled is not False and x.device.type == "cpu" and x.requires_grad and rows >= 2
                and not torch.compiler.is_compiling()  # inside a compiled model: the outer compile fuses
                and not is_in_torch_dispatch_mode()):  # a dispatch mode (a FLOP counter): eager
            if self.compiled is None:
                self.compiled = torch.compile(self.fn)
            flat = x.reshape(rows, x.size(-1))
            try:
                trusted = self._trusted(flat, args)
                out = _call_dynamic(self.compiled, flat, args) if trusted else None
            except Exception as error:  # a missing or broken compiler shows up at the first call
                warnings.warn(f"gptbert: compiling the CPU {self.what} kernel failed "
                              f"({type(error).__name__}: {error_line(error, first=True)}); using eager ops")
                self.compiled = False
            else:
                if isinstance(out, tuple):
                    return out
                if out is not None:  # None: not trusted on this CPU, the eager ops below
                    return out.view(*x.shape[:-1], out.size(-1))
        return self.eager(x, *args)

    def _trusted(self, flat: torch.Tensor, args: tuple) -> bool:
        """Whether the compiled kernel matched the eager maths for inputs shaped like these on this
        CPU: from this process, else from the on-disk cache, else checked now (and cached)."""
        signature = _signature(flat, args)
        if signature not in self.trusted:
            key = f"{self.what}|{signature}|{cpu_kind()}|torch {torch.__version__}"
            verdict = CHECKS.get(key)
            if verdict is None:
                verdict = self_check(self.compiled, self.eager, flat, args)
                CHECKS.put(key, verdict)
            self.trusted[signature] = verdict["ok"]
            if not verdict["ok"]:
                warnings.warn(f"gptbert: the compiled CPU {self.what} kernel differs from the plain maths on "
                              f"this CPU ({cpu_kind()}, torch {torch.__version__}: {verdict['why']}); "
                              "using eager ops")
        return self.trusted[signature]


def _call_dynamic(fn, flat: torch.Tensor, args: tuple):
    """``fn(flat, *args)`` with the row dimension marked dynamic in every argument that has it."""
    rows = flat.size(0)
    torch._dynamo.mark_dynamic(flat, 0)
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() >= 1 and a.size(0) == rows:
            torch._dynamo.mark_dynamic(a, 0)
    return fn(flat, *args)


def _signature(flat: torch.Tensor, args: tuple) -> str:
    """What the generated code depends on besides the (dynamic) row count."""
    parts = [f"{flat.dtype}x{flat.size(1)}"]
    parts += [f"{a.dtype}{list(a.shape[1:])}" if isinstance(a, torch.Tensor) else repr(a) for a in args]
    autocast = _cpu_autocast()
    return ",".join(parts + [autocast] if autocast else parts)


def _cpu_autocast() -> str | None:
    """The CPU autocast a kernel runs under (part of what a verdict is for), None without one."""
    return f"autocast {torch.get_autocast_dtype('cpu')}" if torch.is_autocast_enabled("cpu") else None


def cpu_kind() -> str:
    """The CPU as inductor generates code for it: its vector ISA (``avx2``, ``avx512``, ``amx``, as
    ``torch._inductor.config.cpp.simdlen`` or ``ATEN_CPU_CAPABILITY`` may narrow it) and ATen's
    capability."""
    from torch._inductor import cpu_vec_isa

    return f"{cpu_vec_isa.pick_vec_isa() or 'no-simd'}/{torch.backends.cpu.get_cpu_capability().lower()}"


# Row counts a self-check runs: a vector-width multiple and ragged ones (tails of every loop).
CHECK_ROWS = (64, 37, 3)


def self_check(compiled, eager, flat: torch.Tensor, args: tuple) -> dict:
    """Compare ``compiled`` with ``eager`` on the first rows of these inputs (forward, and the
    backward of every floating input that needs a gradient, with fixed random output gradients),
    at ``CHECK_ROWS`` row counts; ``{"ok": bool, "why": str}``. Leaves the global RNG alone."""
    generator = torch.Generator().manual_seed(0)
    tolerance = 3e-2 if flat.dtype != torch.float32 or torch.is_autocast_enabled("cpu") else 1e-4
    worst, where = 0.0, "output"
    for n in sorted({min(r, flat.size(0)) for r in CHECK_ROWS} - {0, 1}, reverse=True):
        inputs = [flat[:n]] + [a[:n] if _has_rows(a, flat) else a for a in args]
        cotangents = None  # drawn once, for both
        results = []
        for fn in (compiled, eager):
            leaves = [_leaf(t) if isinstance(t, torch.Tensor) else t for t in inputs]
            with torch.enable_grad():
                out = _call_dynamic(fn, leaves[0], tuple(leaves[1:])) if fn is compiled else fn(*leaves)
                outs = [o for o in (out if isinstance(out, tuple) else (out,))]
                needs = [o for o in outs if o.requires_grad]
                wrt = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
                if cotangents is None:
                    cotangents = [torch.randn(o.shape, generator=generator).to(o.dtype) for o in needs]
                grads = torch.autograd.grad(needs, wrt, cotangents, allow_unused=True) if needs and wrt else ()
            results.append(([o.detach() for o in outs], list(grads)))
        (outs_c, grads_c), (outs_e, grads_e) = results
        pairs = [("output", a, b) for a, b in zip(outs_c, outs_e)] + [("gradient", a, b) for a, b in zip(grads_c, grads_e)]
        if len(outs_c) != len(outs_e) or [g is None for g in grads_c] != [g is None for g in grads_e]:
            return {"ok": False, "why": f"a different number of outputs or gradients at {n} rows"}
        for what, a, b in pairs:
            error = 0.0 if a is None else _relative_error(a, b)
            if not error <= worst:  # NaN counts as the worst
                worst, where = error, f"{what} at {n} rows"
    if not worst <= tolerance:
        return {"ok": False, "why": f"relative error {worst:.3g} in the {where}, tolerance {tolerance:g}"}
    return {"ok": True, "why": f"relative error {worst:.3g}"}


def _has_rows(a, flat: torch.Tensor) -> bool:
    return isinstance(a, torch.Tensor) and a.dim() >= 1 and a.size(0) == flat.size(0)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    copy = t.detach().clone()
    return copy.requires_grad_() if t.requires_grad and t.is_floating_point() else copy


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over the scale of b (at least 1): NaN where either has one and the other not."""
    a, b = a.float(), b.float()
    if a.shape != b.shape:
        return float("nan")
    if a.numel() == 0:
        return 0.0
    if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
        return float("nan")
    finite = torch.isfinite(b)
    diff = (a[finite] - b[finite]).abs().max() if finite.any() else torch.tensor(0.0)
    scale = max(1.0, float(b[finite].abs().max())) if finite.any() else 1.0
    return float(diff) / scale


class KernelChecks:
    """Self-check verdicts on disk (``kernel-checks.json`` under the gptbert cache), keyed by kernel,
    input signature, CPU kind and torch release: a later process on the same CPU and torch skips the
    check. A file that cannot be read or written only costs a check."""

    def __init__(self, path: Path | None = None):
        self._path = path

    @property
    def path(self) -> Path:
        return self._path or cache_root() / "kernel-checks.json"

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> dict | None:
        verdict = self._read().get(key)
        return verdict if isinstance(verdict, dict) and isinstance(verdict.get("ok"), bool) else None

    def put(self, key: str, verdict: dict) -> None:
        data = self._read()
        data[key] = verdict
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())
        except OSError as error:
            log.debug("kernel self-check verdict not cached (%s)", error)


CHECKS = KernelChecks()


class CompiledForward:
    """``model.forward`` compiled, falling back to the eager forward after a failed compile, and on
    a CPU where the compiled model differs from the eager one (``check_on_cpu``)."""

    def __init__(self, model: nn.Module):
        self.eager = model.forward  # the bound method of the class, before this object replaces it
        self.compiled = torch.compile(self.eager)
        self.failed: str | None = None  # the error that sent the model back to eager
        self.first_call_s: float | None = None  # the first call: tracing and compiling included
        self.checked_on_cpu = False

    def __call__(self, *args, **kwargs):
        if self.failed is None:
            started = time.perf_counter()
            self._build_position_table(args)
            try:
                if not self.checked_on_cpu and _first_tensor_device(args) == "cpu":
                    self.checked_on_cpu = True
                    verdict = self.check_on_cpu(args, kwargs)
                    if not verdict["ok"]:
                        self.failed = f"differs from the eager model on this CPU ({cpu_kind()}: {verdict['why']})"
                        warnings.warn(f"gptbert: the compiled model {self.failed}; training continues with the "
                                      "eager model")
                        return self.eager(*args, **kwargs)
                out = self.compiled(*args, **kwargs)
            except Exception as error:  # a compiler failure shows up at the call that compiles
                elapsed = time.perf_counter() - started
                self.failed = f"{type(error).__name__}: {error_line(error, first=True)}"
                warnings.warn(f"gptbert: torch.compile of the model failed after {elapsed:.1f} s "
                              f"({self.failed}); training continues with the eager model")
            else:
                if self.first_call_s is None:
                    self.first_call_s = time.perf_counter() - started
                    log.info("model compiled in %.1f s (first forward)", self.first_call_s)
                return out
        return self.eager(*args, **kwargs)

    def _build_position_table(self, args: tuple) -> None:
        """The model's cached (T, T) position-bucket table built by eager code, before a compiled
        graph would build it: inductor's AVX2 code for ``relative_position_buckets`` (int64 -> float
        log -> int) gives wrong buckets for 99% of the entries (torch 2.13), and the cached table
        would then be wrong for the eager model too."""
        model = self.eager.__self__
        ids = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if ids is not None and ids.dim() == 2 and hasattr(model, "position_index"):
            model.position_index(ids.size(1), ids.device)

    def check_on_cpu(self, args: tuple, kwargs: dict) -> dict:
        """The compiled and the eager forward on these inputs, compared (``{"ok", "why"}``; the
        verdict cached like the kernels' per model config, CPU kind and torch release). Inductor's
        AVX2 code for the whole model has been wrong where its AVX-512 code was right. The check
        runs in eval mode without gradients (dropout would make the two differ by their random
        streams; the training graph is compiled separately afterwards), the RNG state untouched."""
        model = self.eager.__self__
        key = f"model|{getattr(model, 'config', type(model).__name__)!r}|{_cpu_autocast() or 'fp32'}|{cpu_kind()}|torch {torch.__version__}"
        verdict = CHECKS.get(key)
        if verdict is not None:
            return verdict
        modes = {m: m.training for m in model.modules()}
        model.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                eager = self.eager(*args, **kwargs)  # first: state built lazily is built by eager code
                compiled = self.compiled(*args, **kwargs)
        finally:
            for m, training in modes.items():
                m.training = training
        tolerance = 5e-2 if torch.is_autocast_enabled("cpu") else 1e-3
        error = _relative_error(compiled, eager)
        verdict = ({"ok": True, "why": f"relative error {error:.3g}"} if error <= tolerance else
                   {"ok": False, "why": f"relative error {error:.3g} in the output, tolerance {tolerance:g}"})
        CHECKS.put(key, verdict)
        return verdict


def _first_tensor_device(args: tuple) -> str | None:
    return next((a.device.type for a in args if isinstance(a, torch.Tensor)), None)


def compile_model(model: GPTBERT) -> GPTBERT:
    """Route ``model``'s forward through ``CompiledForward`` (in place); returns ``model``."""
    if isinstance(model.__dict__.get("forward"), CompiledForward):
        return model
    if model.layer_weights is not None:
        model.layer_mix = LayerWeighting()
    model.forward = CompiledForward(model)  # an instance attribute: nn.Module.__call__ calls it
    return model


__all__ = ["CHECKS", "CompiledForward", "CompiledOnCpu", "KernelChecks", "compile_model", "cpu_kind", "self_check"]
