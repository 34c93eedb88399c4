"""`torch.compile` of a module's forward, in place, with a clean fallback to eager.

The module object stays the same (its `forward` attribute is replaced), so state_dict keys, checkpoints,
EMA and ONNX export see the plain module: no `_orig_mod.` prefixes. Compilation is lazy in PyTorch, so
failure can come either from `torch.compile` itself or from a call that traces (or retraces) the graph; in both
cases a warning is logged once and the module runs eagerly from then on. Only the compiler stack's own
exceptions (dynamo's, inductor's) count as such a failure: an out-of-memory error or an error raised by the
model's code propagates unchanged, and the compiled forward stays. A deep copy of the module (EMA, export
copies) gets the plain eager forward bound to the copy, never a forward that runs the original.
"""

from __future__ import annotations

import functools
import logging
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


@functools.cache
def compiler_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean "the compiler failed", as far as the installed torch has them: every
    TorchDynamoException (Unsupported, BackendCompilerFailed, InternalTorchDynamoError, TorchRuntimeError, ...;
    recent inductor's InductorError is one) and inductor's own compile/lowering errors, which older torch may
    raise unwrapped. torch.OutOfMemoryError and the model's errors are not among them."""
    import torch._dynamo.exc as dynamo_exc

    found: list[type[BaseException]] = [dynamo_exc.TorchDynamoException]
    try:
        import torch._inductor.exc as inductor_exc
    except ImportError:  # a torch without inductor
        inductor_exc = None
    names = ("InductorError", "LoweringException", "CppCompileError", "CppWrapperCodegenError")
    for module, name in [(inductor_exc, n) for n in names] + [(dynamo_exc, "TritonUnavailableError")]:
        cls = getattr(module, name, None) if module is not None else None
        if isinstance(cls, type) and issubclass(cls, Exception) and not issubclass(cls, tuple(found)):
            found.append(cls)
    return tuple(found)


class _CompiledForward:
    """Calls the compiled forward; when the compiler fails, logs a warning once and falls back to `eager` for
    good. Any other exception (out of memory, a bug in the model) propagates and the compiled forward stays."""

    def __init__(self, compiled: Callable[..., Any], eager: Callable[..., Any], what: str) -> None:
        self.compiled: Callable[..., Any] | None = compiled
        self.eager = eager
        self.what = what

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except compiler_errors() as exc:  # only the compiler's failures mean: run eagerly
                log.warning(
                    "torch.compile of the %s failed (%s); running it eagerly", self.what, _first_line(exc)
                )
                self.compiled = None
        return self.eager(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        owner = getattr(self.eager, "__self__", None)
        copy_of_owner = memo.get(id(owner))
        if (
            copy_of_owner is None
        ):  # copied on its own, not as part of its module: keep pointing at the original
            return self
        return types.MethodType(self.eager.__func__, copy_of_owner)  # type: ignore[attr-defined]


def compile_forward(module: nn.Module, what: str, **options: Any) -> bool:
    """Replace `module.forward` by a compiled version that falls back to eager; True if compilation was set up.

    `what` names the module in the warning ("student", "teacher")."""
    eager = module.forward
    try:
        compiled = torch.compile(eager, **options)
    except Exception as exc:  # noqa: BLE001
        log.warning("torch.compile of the %s failed (%s); running it eagerly", what, _first_line(exc))
        return False
    module.forward = _CompiledForward(compiled, eager, what)  # type: ignore[method-assign]
    return True


def is_compiled(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return isinstance(forward, _CompiledForward) and forward.compiled is not None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
