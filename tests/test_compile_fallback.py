"""The compiled forward falls back to eager only when the compiler stack fails (dynamo/inductor exceptions);
an out-of-memory or an error of the model's own code propagates unchanged and the compiled forward stays."""

from __future__ import annotations

import logging

import pytest
import torch
import torch._dynamo.exc
from torch import nn

from kdlab.engine.compile import compile_forward, is_compiled


class _Double(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def _compiled_raising(monkeypatch, errors: list[BaseException | None]) -> list[int]:
    """torch.compile gives a forward that raises the next of `errors` on each call (None: runs the eager fn)."""
    calls: list[int] = []

    def fake_compile(fn, **kwargs):
        def run(*args, **kw):
            calls.append(1)
            error = errors.pop(0) if errors else None
            if error is not None:
                raise error
            return fn(*args, **kw)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    return calls


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"),
        ValueError("the batch has no images"),
    ],
    ids=["oom", "runtime", "value"],
)
def test_errors_that_are_not_the_compilers_propagate_and_keep_the_compiled_forward(
    monkeypatch, caplog, error
):
    calls = _compiled_raising(monkeypatch, [error])
    model = _Double()
    assert compile_forward(model, "student")
    with caplog.at_level(logging.WARNING, logger="kdlab.engine.compile"):
        with pytest.raises(type(error)) as raised:
            model(torch.ones(2))
        assert raised.value is error  # unchanged, not wrapped
        assert torch.equal(model(torch.ones(2)), torch.full((2,), 2.0))
    assert len(calls) == 2  # the second call went through the compiled forward again
    assert is_compiled(model) and "eagerly" not in caplog.text


def _compiler_error(cls: type[BaseException]) -> BaseException:
    """An instance of a compiler exception class without its version-specific constructor arguments."""
    error = cls.__new__(cls)
    BaseException.__init__(error, f"{cls.__name__} from the compiler\nmore detail")
    return error


def _compiler_errors() -> list[BaseException]:
    """The compiler stack's failures: dynamo's (any TorchDynamoException) and inductor's where they exist."""
    import torch._inductor.exc as inductor_exc

    dynamo = torch._dynamo.exc
    classes = [dynamo.InternalTorchDynamoError, dynamo.Unsupported, dynamo.BackendCompilerFailed]
    classes += [getattr(inductor_exc, n) for n in ("InductorError", "CppCompileError", "LoweringException")
                if hasattr(inductor_exc, n)]  # fmt: skip
    return [_compiler_error(cls) for cls in classes]


@pytest.mark.parametrize("error", _compiler_errors(), ids=lambda e: type(e).__name__)
def test_a_compiler_failure_falls_back_to_eager_once_and_logs_once(monkeypatch, caplog, error):
    calls = _compiled_raising(monkeypatch, [error])
    model = _Double()
    assert compile_forward(model, "teacher")
    with caplog.at_level(logging.WARNING, logger="kdlab.engine.compile"):
        assert torch.equal(model(torch.ones(2)), torch.full((2,), 2.0))
        assert torch.equal(model(torch.ones(2)), torch.full((2,), 2.0))
    assert len(calls) == 1 and not is_compiled(model)
    assert caplog.text.count("torch.compile of the teacher failed") == 1
    assert type(error).__name__ in caplog.text
