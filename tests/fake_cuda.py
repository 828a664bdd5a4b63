"""A CUDA look-alike device, so that tests can run real code with ``--device cuda`` on a CPU.

Device bugs (a CPU tensor meeting a CUDA tensor, ``.numpy()`` of a CUDA tensor, a CUDA tensor
in a forked DataLoader worker...) then fail in CI as they would on a GPU. A tensor "on cuda" is
a :class:`FakeCudaTensor`: a wrapper around a real CPU tensor that reports ``cuda:0`` and refuses
what CUDA refuses, while every op runs the ordinary CPU kernel, so forward, backward and
optimizer steps give the same numbers as a plain CPU run.

Use::

    from fake_cuda import fake_cuda, fake_cuda_device   # tests/ is on sys.path under pytest

    def test_on_cuda(fake_cuda_device):                  # fixture; its value is torch.device("cuda", 0)
        ...
    with fake_cuda():                                    # context manager; fake_cuda(devices=0): no GPU
        ...
    python tests/fake_cuda.py SCRIPT.py ARGS...          # run a script as __main__ under it

Emulated
    * ``torch.cuda``: is_available, device_count, current_device, set_device, synchronize,
      get_device_name/_capability/_properties, manual_seed[_all], seed[_all], empty_cache,
      memory counters (always 0), is_bf16_supported, is_initialized, init, current_stream (idle,
      never capturing), ``torch.cuda.device`` contexts (no-ops); the ``torch.accelerator`` queries
      that the DataLoader and optimizers make.
    * Moves, all differentiable both ways: ``Tensor.to/.cuda/.cpu``, ``Module.to/.cuda/.cpu``
      (parameters keep their identity on the way to cuda, so an optimizer made earlier still
      works), ``copy_`` across devices, factories with a cuda ``device=`` (also inside
      torch.nn.functional), ``torch.load(map_location=<cuda>)``.
    * Refusals with PyTorch's messages: ops mixing cuda and cpu tensors (pointwise ops and the
      value of fill_/masked_fill_/index_put_ accept a 0-dim cpu tensor; a cpu index may index a
      cuda tensor, not the reverse), ``.numpy()``/``np.asarray`` of cuda tensors, cuda in a forked
      DataLoader worker, pinning a cuda tensor, devices other than cuda:0.
    * Pinned memory (a pinned copy is a CPU tensor that reports ``is_pinned()``), also in the
      DataLoader's pin thread; ``torch.autocast("cuda", dtype)`` runs CPU autocast with that dtype
      (float16 by default); ``torch.amp.GradScaler("cuda")``; ``torch.save`` writes plain CPU
      tensors, never the subclass; ``fake_cuda(devices=0)`` behaves like a machine without a GPU.

NOT emulated
    * streams and events beyond the idle current stream, CUDA graphs, cuda RNG state and
      ``torch.Generator(device="cuda")`` (random ops draw from the CPU generator, so the numbers
      match a CPU run, not a GPU run), cudnn (modules take their native path), ``Tensor.type``
      conversion of cpu tensors to ``torch.cuda.*Tensor``;
    * more than one GPU (``devices`` is 0 or 1), NCCL / DistributedDataParallel on cuda;
    * real CUDA numerics (float16 runs CPU float16 kernels), memory limits and out-of-memory
      errors, asynchrony of ``non_blocking`` copies;
    * ``torch.load(map_location=None)`` restoring a checkpoint onto cuda: the files written here
      hold CPU storages, so they load on the CPU;
    * other threads: the interception of moves and factories is per thread (torch's modes are
      thread-local), only pinning is patched process-wide; DataLoader workers started with
      "spawn" or "forkserver" do not inherit the emulation (forked ones do);
    * device checks inside autograd's backward pass: autograd makes CPU zeros for undefined
      gradients there, so mixing is tolerated while the engine runs a backward pass (forward
      passes and optimizer steps are always checked);
    * ``Module.cpu()`` of a cuda model makes new parameter objects (real CUDA keeps them);
      torch.compile; speed: every op on cuda pays a Python dispatch (small ops run several times
      slower than on the CPU).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import os
import runpy
import sys
import threading
import types
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

__all__ = ["FakeCudaTensor", "fake_cuda", "fake_cuda_device", "is_active", "main", "to_cpu", "to_fake"]

CUDA0 = torch.device("cuda", 0)
FORK_ERROR = ("Cannot re-initialize CUDA in forked subprocess. To use CUDA with multiprocessing, "
              "you must use the 'spawn' start method")
NO_GPU_ERROR = "No CUDA GPUs are available"
ORDINAL_ERROR = "CUDA error: invalid device ordinal"
NUMPY_ERROR = ("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the "
               "tensor to host memory first.")

# Number of emulated devices, None when off. A plain global, not thread-local: the DataLoader
# pin thread and forked workers must see it too.
_devices: int | None = None


def is_active() -> bool:
    """Whether fake_cuda() is active (in this process, or in the one that forked it)."""
    return _devices is not None


def _refuse_in_worker() -> None:
    # a forked DataLoader worker cannot use CUDA: real torch refuses to initialise it there
    if torch.utils.data.get_worker_info() is not None:
        raise RuntimeError(FORK_ERROR)


def _cuda_index(device: Any) -> int | None:
    """The cuda ordinal `device` names (0 for a bare "cuda"), None when it is no cuda device."""
    if isinstance(device, int) and not isinstance(device, bool):
        return device  # torch reads a bare int as a cuda ordinal
    if isinstance(device, str):
        device = torch.device(device)
    if not isinstance(device, torch.device) or device.type != "cuda":
        return None
    return device.index or 0


def _check_cuda_device(index: int) -> None:
    """Refuse a cuda device that the emulation does not have, as real CUDA would."""
    _refuse_in_worker()
    if not _devices:
        raise RuntimeError(NO_GPU_ERROR)
    if not 0 <= index < _devices:
        raise RuntimeError(ORDINAL_ERROR)


def _is_cpu(device: Any) -> bool:
    return device is not None and _cuda_index(device) is None and torch.device(device).type == "cpu"


# ----------------------------------------------------------------------------- the tensor subclass

class FakeCudaTensor(torch.Tensor):
    """A tensor that says it is on cuda:0 while holding a real CPU tensor, ``elem``.

    Its C++ device is CPU on purpose: autograd then runs its CPU engine (a cuda device would
    need a CUDA device guard, which a machine without a GPU lacks) and CPU autocast applies.
    Python sees cuda through the overridden ``device``, ``is_cuda``, ``get_device``, ``type``."""

    elem: torch.Tensor
    # only __torch_dispatch__ (below autograd) handles ops; Python methods run as they are
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, elem: torch.Tensor, requires_grad: bool = False) -> FakeCudaTensor:
        _refuse_in_worker()
        if isinstance(elem, FakeCudaTensor) or elem.device.type != "cpu":
            raise TypeError(f"FakeCudaTensor wraps a plain CPU tensor, not a {type(elem).__name__} "
                            f"on {elem.device}")
        out = torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(),
            dtype=elem.dtype, layout=elem.layout, device=elem.device, requires_grad=requires_grad)
        out.elem = elem
        return out

    # A "traceable wrapper subclass" makes Module._apply swap parameters in place
    # (torch.utils.swap_tensors), so they keep their identity through model.to("cuda").
    def __tensor_flatten__(self) -> tuple[list[str], None]:
        return ["elem"], None

    @staticmethod
    def __tensor_unflatten__(inner: dict, meta: Any, outer_size: Any, outer_stride: Any) -> FakeCudaTensor:
        return FakeCudaTensor(inner["elem"])

    # --- what Python sees
    @property
    def device(self) -> torch.device:
        return CUDA0

    @property
    def is_cuda(self) -> bool:
        return True

    @property
    def is_cpu(self) -> bool:
        return False

    def get_device(self) -> int:
        return 0

    def type(self, dtype: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
        if dtype is None:
            return self.elem.type().replace("torch.", "torch.cuda.", 1)
        if isinstance(dtype, str):
            dtype = dtype.replace(".cuda.", ".", 1)
        return super().type(dtype, non_blocking, **kwargs)

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        # torch prints a subclass as "Parameter(FakeCudaTensor(...))"; print what CUDA prints
        text = torch._tensor_str._str(self, tensor_contents=tensor_contents)
        is_param = text.startswith("Parameter(")
        if is_param:
            text = text[len("Parameter("):-1]
        ours, theirs = type(self).__name__ + "(", "tensor("
        text = theirs + text[len(ours):].replace("\n" + " " * len(ours), "\n" + " " * len(theirs))
        return "Parameter containing:\n" + text if is_param else text

    def __format__(self, spec: str) -> str:
        # Tensor.__format__ formats a 0-dim tensor as a number only when type(self) is Tensor
        return self.item().__format__(spec) if self.dim() == 0 else object.__format__(self, spec)

    def numpy(self, *, force: bool = False) -> Any:
        if not force:
            raise TypeError(NUMPY_ERROR)
        return self.cpu().numpy(force=True)

    def tolist(self) -> Any:
        _refuse_in_worker()
        return self.elem.tolist()  # the C++ tolist would read the wrapper's (absent) storage

    # --- moves; torch calls made here must not reach our torch-function mode (it would
    # handle them a second time)
    def to(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        with torch._C.DisableTorchFunction():
            return _tensor_to(self, *args, **kwargs)

    def cuda(self, device: Any = None, non_blocking: bool = False, **kwargs: Any) -> torch.Tensor:
        with torch._C.DisableTorchFunction():
            return _tensor_cuda(self, device, non_blocking, **kwargs)

    def cpu(self, memory_format: torch.memory_format = torch.preserve_format) -> torch.Tensor:
        with torch._C.DisableTorchFunction():
            return _tensor_to(self, "cpu", memory_format=memory_format)

    def pin_memory(self, device: Any = None) -> torch.Tensor:
        raise RuntimeError(f"cannot pin '{self.type()}' only dense CPU tensors can be pinned")

    def is_pinned(self, device: Any = None) -> bool:
        return False

    # --- storage: refused in a forked worker (its collate and queue reach for it), otherwise
    # the CPU storage underneath
    def untyped_storage(self) -> torch.UntypedStorage:
        _refuse_in_worker()
        return self.elem.untyped_storage()

    def _typed_storage(self) -> Any:
        _refuse_in_worker()
        return self.elem._typed_storage()

    def data_ptr(self) -> int:
        _refuse_in_worker()
        return self.elem.data_ptr()

    # --- pickling writes an ordinary CPU tensor (weights_only loading refuses unknown types)
    def __reduce_ex__(self, protocol: int) -> Any:
        _refuse_in_worker()
        plain = self.elem.detach().requires_grad_(self.requires_grad)
        if getattr(self, "_is_param", False):
            return torch.nn.Parameter(plain, self.requires_grad).__reduce_ex__(protocol)
        return plain.__reduce_ex__(protocol)

    def __deepcopy__(self, memo: dict) -> FakeCudaTensor:
        if not self.is_leaf:
            raise RuntimeError("Only Tensors created explicitly by the user (graph leaves) support "
                               "the deepcopy protocol at the moment.")
        if id(self) in memo:
            return memo[id(self)]
        new = FakeCudaTensor(self.elem.detach().clone(), requires_grad=self.requires_grad)
        memo[id(self)] = new
        for key, value in self.__dict__.items():  # _is_param and the like
            if key != "elem":
                setattr(new, key, copy.deepcopy(value, memo))
        if self.grad is not None:
            new.grad = copy.deepcopy(self.grad, memo)
        return new

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        _refuse_in_worker()
        kwargs = kwargs or {}
        _check_devices(func, args, kwargs)
        originals: dict[int, torch.Tensor] = {}
        unwrap = functools.partial(_unwrap, originals=originals)
        out = func(*_map(unwrap, args), **{k: _map(unwrap, v) for k, v in kwargs.items()})
        return _map(functools.partial(_wrap_output, originals=originals), out)


def _map(fn: Callable[[Any], Any], value: Any) -> Any:
    """fn over the leaves of aten arguments or results: values in (nested) lists and tuples.
    (Cheaper than torch's pytree, which matters on every op.)"""
    if isinstance(value, (list, tuple)):
        return type(value)(_map(fn, v) for v in value)
    return fn(value)


def _unwrap(x: Any, originals: dict[int, torch.Tensor]) -> Any:
    if not isinstance(x, torch.Tensor):
        return x
    plain = x.elem if isinstance(x, FakeCudaTensor) else x
    originals[id(plain)] = x
    return plain


def _wrap_output(x: Any, *, originals: dict[int, torch.Tensor]) -> Any:
    # an output that is an input (in-place and out= ops) comes back as that very input
    if not isinstance(x, torch.Tensor):
        return x
    original = originals.get(id(x))
    return FakeCudaTensor(x) if original is None else original


# ----------------------------------------------------------------------------- device checks

aten = torch.ops.aten
INDEX_OPS = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default,
             aten._unsafe_index.Tensor, aten._unsafe_index_put.default}
CROSS_DEVICE_OPS = {aten.copy_.default, aten.copy.default, aten._copy_from.default,
                    aten._copy_from_and_resize.default}
# non-pointwise ops whose named argument may be a 0-dim cpu tensor (they read it with .item()
# or move it themselves)
SCALAR_ARGUMENTS = {"aten::fill_": "value", "aten::fill": "value", "aten::masked_fill_": "value",
                    "aten::masked_fill": "value", "aten::index_put_": "values", "aten::index_put": "values",
                    "aten::_index_put_impl_": "values", "aten::_unsafe_index_put": "values"}


@functools.cache
def _argument_names(func: Any) -> tuple[str, ...]:
    return tuple(a.name for a in func._schema.arguments)


@functools.cache
def _is_pointwise(func: Any) -> bool:
    return torch.Tag.pointwise in func.tags


def _check_devices(func: Any, args: tuple, kwargs: dict) -> None:
    """Raise what real CUDA raises when an op meets tensors on different devices."""
    if func in CROSS_DEVICE_OPS or torch._C._current_graph_task_id() != -1:
        return  # copies cross devices; autograd's backward makes cpu zeros for undefined grads
    tensors = list(_named_tensors(func, args, kwargs))
    if func in INDEX_OPS:
        tensors = _check_indices(tensors)
    tensors = [(name, t) for name, t in tensors if not _cpu_scalar_allowed(func, name, t)]
    first = tensors[0][1] if tensors else None
    if _is_pointwise(func):  # TensorIterator names the non-cpu device first
        first = next((t for _, t in tensors if isinstance(t, FakeCudaTensor)), first)
    for name, t in tensors:
        if isinstance(t, FakeCudaTensor) != isinstance(first, FakeCudaTensor):
            raise RuntimeError(
                "Expected all tensors to be on the same device, but found at least two devices, "
                f"{_device_name(first)} and {_device_name(t)}! "
                f"(when checking argument for argument {name} in method {func._schema.name})")


def _named_tensors(func: Any, args: tuple, kwargs: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """(argument name, tensor) for every tensor argument of an aten call, lists included."""
    for name, value in list(zip(_argument_names(func), args)) + list(kwargs.items()):
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, torch.Tensor):
                yield name, item


def _cpu_scalar_allowed(func: Any, name: str, t: torch.Tensor) -> bool:
    """A 0-dim cpu tensor is a scalar for TensorIterator (pointwise) kernels and for the value
    of fill_/masked_fill_/index_put_."""
    if isinstance(t, FakeCudaTensor) or t.dim() != 0 or t.device.type != "cpu":
        return False
    return _is_pointwise(func) or SCALAR_ARGUMENTS.get(func._schema.name) == name


def _check_indices(tensors: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """Indexing takes cpu indices for a cuda tensor, not cuda indices for a cpu tensor.
    Returns the tensors left for the general check."""
    indexed_is_cuda = isinstance(tensors[0][1], FakeCudaTensor)
    if not indexed_is_cuda and any(isinstance(t, FakeCudaTensor) for name, t in tensors if name == "indices"):
        raise RuntimeError("indices should be either on cpu or on the same device as the indexed tensor (cpu)")
    return [(name, t) for name, t in tensors if name != "indices"]


def _device_name(t: torch.Tensor) -> str:
    return "cuda:0" if isinstance(t, FakeCudaTensor) else str(t.device)


# ----------------------------------------------------------------------------- differentiable moves

class _ToCuda(torch.autograd.Function):
    """cpu -> cuda look-alike; the gradient goes back to cpu."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, copy: bool) -> torch.Tensor:
        return FakeCudaTensor(t.detach().clone() if copy else t.detach())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return to_cpu(grad, copy=False), None


class _ToCpu(torch.autograd.Function):
    """cuda look-alike -> cpu; the gradient goes back to the look-alike."""

    @staticmethod
    def forward(ctx: Any, t: FakeCudaTensor, copy: bool) -> torch.Tensor:
        return t.elem.clone() if copy else t.elem.detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad if isinstance(grad, FakeCudaTensor) else _ToCuda.apply(grad, False), None


def to_fake(t: torch.Tensor, copy: bool = True) -> torch.Tensor:
    """`t` on the look-alike cuda:0 (`t` itself if it is there); `copy=False` lets a temporary
    share its storage with the result."""
    if isinstance(t, FakeCudaTensor):
        return t
    _check_cuda_device(0)
    if t.device.type != "cpu":
        raise RuntimeError(f"fake_cuda moves cpu tensors to cuda, not {t.device} ones")
    return _ToCuda.apply(t, copy)


def to_cpu(t: torch.Tensor, copy: bool = True) -> torch.Tensor:
    """`t` as a plain CPU tensor (`t` itself if it is one)."""
    if not isinstance(t, FakeCudaTensor):
        return t
    _refuse_in_worker()
    return _ToCpu.apply(t, copy)


def _move(t: torch.Tensor, device: Any, copy: bool) -> torch.Tensor:
    """`t` on `device`: cpu or a cuda device."""
    index = _cuda_index(device)
    if index is None:
        return to_cpu(t, copy)
    _check_cuda_device(index)
    return to_fake(t, copy)


# ----------------------------------------------------------------------------- Tensor.to and friends

def _parse_to(args: tuple, kwargs: dict) -> tuple[Any, Any, bool, bool, Any]:
    """Tensor.to's arguments as (device, dtype, non_blocking, copy, memory_format)."""
    kwargs = dict(kwargs)
    copy = kwargs.pop("copy", False)
    if args and isinstance(args[0], torch.Tensor):  # to(other, non_blocking=False, copy=False)
        other, rest = args[0], list(args[1:])
        non_blocking = rest.pop(0) if rest else kwargs.get("non_blocking", False)
        copy = rest.pop(0) if rest else copy
        return other.device, other.dtype, non_blocking, copy, kwargs.get("memory_format")
    args = list(args)
    # to(dtype, non_blocking, copy) or to(device, dtype, non_blocking, copy); _parse_to has no copy
    copy_at = 2 if args and isinstance(args[0], torch.dtype) else 3
    if len(args) > copy_at:
        copy = args.pop(copy_at)
    device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
    return device, dtype, non_blocking, copy, memory_format


def _tensor_to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    device, dtype, non_blocking, copy, memory_format = _parse_to(args, kwargs)
    here = "cuda" if isinstance(self, FakeCudaTensor) else self.device.type
    there = None if device is None else "cuda" if _cuda_index(device) is not None else torch.device(device).type
    if there not in (None, "cuda", "cpu") or here not in ("cuda", "cpu"):
        return torch.Tensor.to(self, *args, **kwargs)  # meta and other devices: torch's business
    if there == "cuda":
        _check_cuda_device(_cuda_index(device))
    moving = there not in (None, here)
    converted = self
    if dtype is not None or memory_format is not None or (copy and not moving):
        # dtype and layout change where the tensor is: C++ must never see a cuda device
        converted = torch.Tensor.to(self, dtype or self.dtype, non_blocking, copy and not moving,
                                    memory_format=memory_format or torch.preserve_format)
    if not moving:
        return converted
    return _move(converted, device, copy=converted is self)


def _tensor_cuda(self: torch.Tensor, device: Any = None, non_blocking: bool = False,
                 memory_format: torch.memory_format = torch.preserve_format) -> torch.Tensor:
    index = _cuda_index("cuda" if device is None else device)
    if index is None:
        raise RuntimeError(f"Invalid device, must be cuda device, got {device}")
    _check_cuda_device(index)
    converted = self if memory_format == torch.preserve_format else self.contiguous(memory_format=memory_format)
    return to_fake(converted, copy=converted is self)


def _tensor_cpu(self: torch.Tensor, memory_format: torch.memory_format = torch.preserve_format) -> torch.Tensor:
    return _tensor_to(self, "cpu", memory_format=memory_format)


def _tensor_copy_(self: torch.Tensor, src: Any, non_blocking: bool = False) -> torch.Tensor:
    # legal across devices; moving src first keeps autograd's CopyBackwards on one device
    if isinstance(src, torch.Tensor) and isinstance(src, FakeCudaTensor) != isinstance(self, FakeCudaTensor):
        src = to_fake(src, copy=False) if isinstance(self, FakeCudaTensor) else to_cpu(src, copy=False)
    return torch.Tensor.copy_(self, src, non_blocking)


def _tensor_new_tensor(self: torch.Tensor, data: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    # new_tensor builds from self's C++ options (cpu) without dispatching: place it ourselves
    if isinstance(self, FakeCudaTensor) and kwargs.get("device") is None:
        kwargs["device"] = CUDA0
    return _factory(torch.Tensor.new_tensor, (self, data, *args), kwargs)


def _set_data(self: torch.Tensor, value: torch.Tensor) -> None:
    if isinstance(value, FakeCudaTensor) != isinstance(self, FakeCudaTensor):
        raise RuntimeError("Attempted to call `variable.set_data(tensor)`, but `variable` and "
                           "`tensor` have incompatible tensor type.")
    torch._C.TensorBase.data.__set__(self, value)
    if isinstance(self, FakeCudaTensor):
        self.elem = value.elem


def _factory(func: Callable, args: tuple, kwargs: dict) -> Any:
    """Run a call that names a device= on cpu, then place its result where it was asked for."""
    index = _cuda_index(kwargs["device"])
    if index is None:
        result = func(*args, **kwargs)
        if not _is_cpu(kwargs["device"]):
            return result
        return tree_map(lambda r: to_cpu(r, copy=_is_input(r, args)) if isinstance(r, torch.Tensor) else r, result)
    _check_cuda_device(index)
    result = func(*args, **{**kwargs, "device": "cpu"})
    return tree_map(lambda r: _placed_on_cuda(r, args), result)


def _placed_on_cuda(r: Any, args: tuple) -> Any:
    if not isinstance(r, torch.Tensor):
        return r
    if r.requires_grad and r.is_leaf and not _is_input(r, args):
        return FakeCudaTensor(r.detach(), requires_grad=True)  # a new leaf: torch.zeros(..., requires_grad=True)
    return to_fake(r, copy=_is_input(r, args))


def _is_input(r: Any, args: tuple) -> bool:
    return any(r is a for a in args)


# ----------------------------------------------------------------------------- modes

# functions that take a device= but create no tensor there
NOT_FACTORIES = {torch._C._nn._parse_to}


class _FakeCudaMode(TorchFunctionMode):
    """Moves, cuda factories and cross-device copies of plain tensors, seen at the torch API."""

    def __init__(self) -> None:
        super().__init__()
        self.handlers: dict[Any, Callable] = {
            torch.Tensor.to: _tensor_to, torch.Tensor.cuda: _tensor_cuda, torch.Tensor.cpu: _tensor_cpu,
            torch.Tensor.copy_: _tensor_copy_, torch.Tensor.new_tensor: _tensor_new_tensor,
            torch._C.TensorBase.data.__set__: _set_data}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        handler = self.handlers.get(func)
        if handler is not None:
            return handler(*args, **kwargs)
        if kwargs.get("device") is not None and func not in NOT_FACTORIES:
            return _factory(func, args, kwargs)
        if not _has_fake(args) and not _has_fake(kwargs.values()):
            return func(*args, **kwargs)
        # a call on cuda tensors: tensors its body creates from their (cpu) options are cuda ones
        _local.on_cuda += 1
        try:
            return func(*args, **kwargs)
        finally:
            _local.on_cuda -= 1


class _LocalState(threading.local):
    on_cuda = 0  # depth of torch calls on look-alike tensors running in this thread


_local = _LocalState()


def _has_fake(values: Iterable) -> bool:
    return any(isinstance(v, FakeCudaTensor) or (isinstance(v, (list, tuple)) and _has_fake(v)) for v in values)


def _has_tensor(values: Iterable) -> bool:
    return any(isinstance(v, torch.Tensor) or (isinstance(v, (list, tuple)) and _has_tensor(v)) for v in values)


class _PlacementMode(TorchDispatchMode):
    """Places the tensors that aten code creates, which the torch-function mode does not see:
    a factory with a cuda device= (e.g. inside torch.nn.functional's Python code) runs on cpu
    and is wrapped, and so is a factory inside a call on cuda tensors (a composite op's
    ``at::zeros(self.options())``, whose options say cpu)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        index = _cuda_index(kwargs.get("device"))
        if index is not None:
            _check_cuda_device(index)
            return _map(_wrap_plain, func(*args, **{**kwargs, "device": torch.device("cpu")}))
        out = func(*args, **kwargs)
        if (_local.on_cuda and torch._C._current_graph_task_id() == -1
                and not _has_tensor(args) and not _has_tensor(kwargs.values())):
            out = _map(_wrap_plain, out)
        return out


def _wrap_plain(x: Any) -> Any:
    return FakeCudaTensor(x) if isinstance(x, torch.Tensor) and not isinstance(x, FakeCudaTensor) else x


# ----------------------------------------------------------------------------- torch.cuda stand-ins

class _Stream:
    """The current stream as optimizers ask about it: idle and never capturing (work runs
    synchronously on the CPU; this is not a stream)."""

    device = CUDA0

    def is_capturing(self) -> bool:
        return False

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass


def _device_index(device: Any = None) -> int:
    """The ordinal a torch.cuda call addresses (None: the current one), checked."""
    index = 0 if device is None else _cuda_index(device)
    if index is None:
        raise ValueError(f"Expected a cuda device, but got: {device}")
    _check_cuda_device(index)
    return index


def _cuda_stand_ins(devices: int) -> dict[str, Callable]:
    """Stand-ins for torch.cuda functions, answering for `devices` look-alike GPUs. Each is its
    own function object: torch._dynamo maps torch functions by identity."""
    props = types.SimpleNamespace(name="fake_cuda (CPU look-alike)", major=8, minor=0, total_memory=16 << 30,
                                  multi_processor_count=1, is_integrated=False, is_multi_gpu_board=False)

    def is_available() -> bool:
        return devices > 0

    def device_count() -> int:
        return devices

    def is_initialized() -> bool:
        return devices > 0

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return devices > 0

    def current_device() -> int:
        return _device_index()

    def set_device(device: Any) -> None:
        _device_index(device)

    def synchronize(device: Any = None) -> None:
        _device_index(device)

    def init() -> None:
        _device_index()

    def get_device_name(device: Any = None) -> str:
        _device_index(device)
        return props.name

    def get_device_capability(device: Any = None) -> tuple[int, int]:
        _device_index(device)
        return props.major, props.minor

    def get_device_properties(device: Any = None) -> types.SimpleNamespace:
        _device_index(device)
        return props

    def current_stream(device: Any = None) -> _Stream:
        _device_index(device)
        return _Stream()

    def is_current_stream_capturing() -> bool:
        return False

    def _exchange_device(device: int) -> int:  # torch.cuda.device(...).__enter__
        return -1 if device < 0 else _device_index(device)

    def _maybe_exchange_device(device: int) -> int:  # torch.cuda.device(...).__exit__
        return -1 if device < 0 else 0

    stand_ins = {f.__name__: f for f in (
        is_available, device_count, is_initialized, is_bf16_supported, current_device, set_device,
        synchronize, init, get_device_name, get_device_capability, get_device_properties, current_stream,
        is_current_stream_capturing, _exchange_device, _maybe_exchange_device)}
    stand_ins["_lazy_init"] = _renamed(init, "_lazy_init")  # C++ calls it before using a cuda device
    stand_ins["default_stream"] = _renamed(current_stream, "default_stream")
    for name in ("manual_seed", "manual_seed_all", "seed", "seed_all", "empty_cache", "ipc_collect",
                 "reset_peak_memory_stats", "reset_max_memory_allocated", "reset_accumulated_memory_stats"):
        stand_ins[name] = _renamed(lambda *args, **kwargs: None, name)
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        stand_ins[name] = _renamed(lambda device=None: 0, name)
    return stand_ins


def _accelerator_stand_ins(devices: int) -> dict[str, Callable]:
    """Stand-ins for the torch.accelerator queries of the DataLoader and the optimizers."""

    def current_accelerator(check_available: bool = False) -> torch.device | None:
        return torch.device("cuda") if devices > 0 or not check_available else None

    def is_available() -> bool:
        return devices > 0

    def device_count() -> int:
        return devices

    def current_device_index() -> int:
        return _device_index()

    def set_device_index(device: Any, /) -> None:
        _device_index(device)

    def synchronize(device: Any = None, /) -> None:
        _device_index(device)

    def current_stream(device: Any = None, /) -> _Stream:
        _device_index(device)
        return _Stream()

    return {f.__name__: f for f in (current_accelerator, is_available, device_count, current_device_index,
                                    set_device_index, synchronize, current_stream)}


def _renamed(fn: Callable, name: str) -> Callable:
    """A copy of `fn` named `name` (a distinct object, see _cuda_stand_ins)."""
    new = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    new.__qualname__ = name
    return new


# ----------------------------------------------------------------------------- pinned memory

# pinned copies by id (a WeakSet would compare tensors with ==); an entry leaves with its tensor
_pinned: dict[int, weakref.ref] = {}


def _pin_memory(self: torch.Tensor, device: Any = None) -> torch.Tensor:
    """Tensor.pin_memory, process-wide (the DataLoader pins in a thread of its own)."""
    if not _devices:
        raise RuntimeError(NO_GPU_ERROR)
    if self.device.type != "cpu" or self.layout != torch.strided:
        raise RuntimeError(f"cannot pin '{self.type()}' only dense CPU tensors can be pinned")
    if _is_pinned(self):
        return self
    pinned = self.clone()
    key = id(pinned)
    _pinned[key] = weakref.ref(pinned, lambda _: _pinned.pop(key, None))
    return pinned


def _is_pinned(self: torch.Tensor, device: Any = None) -> bool:
    """Tensor.is_pinned: true for a copy made by _pin_memory and for views of one."""
    return any(t is not None and _pinned.get(id(t), lambda: None)() is t for t in (self, self._base))


# ----------------------------------------------------------------------------- other patches

class _Patches:
    """Attribute replacements, undone exactly and in reverse order."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def set(self, owner: Any, name: str, value: Any) -> None:
        if isinstance(owner, type) and name not in owner.__dict__:
            self._undo.append(lambda: delattr(owner, name))  # inherited: drop our override
        else:
            old = getattr(owner, name)
            self._undo.append(lambda: setattr(owner, name, old))
        setattr(owner, name, value)

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()


def _patch_autocast(patches: _Patches) -> None:
    """torch.autocast("cuda", dtype) runs CPU autocast with that dtype (float16 by default: the
    cuda default), and the autocast queries for "cuda" answer for it."""
    cls = torch.amp.autocast_mode.autocast
    original_init = cls.__init__
    is_enabled, get_dtype = torch.is_autocast_enabled, torch.get_autocast_dtype

    def __init__(self: Any, device_type: str, dtype: torch.dtype | None = None, enabled: bool = True,
                 cache_enabled: bool | None = None) -> None:
        if device_type == "cuda":
            device_type, dtype = "cpu", dtype or torch.float16
        original_init(self, device_type, dtype, enabled, cache_enabled)

    def is_autocast_enabled(device_type: str = "cuda") -> bool:
        return is_enabled("cpu" if device_type == "cuda" else device_type)

    def get_autocast_dtype(device_type: str) -> torch.dtype:
        if device_type != "cuda":
            return get_dtype(device_type)
        return get_dtype("cpu") if is_enabled("cpu") else torch.float16

    patches.set(cls, "__init__", __init__)
    patches.set(torch, "is_autocast_enabled", is_autocast_enabled)
    patches.set(torch, "get_autocast_dtype", get_autocast_dtype)


def _patch_load(patches: _Patches) -> None:
    """torch.load(map_location=<cuda>) loads on the CPU, then moves every tensor to cuda."""
    original = torch.load

    def load(f: Any, map_location: Any = None, *args: Any, **kwargs: Any) -> Any:
        location = map_location.get("cpu") if isinstance(map_location, dict) else map_location
        if location is None or callable(location) or _cuda_index(location) is None:
            return original(f, map_location, *args, **kwargs)
        _check_cuda_device(_cuda_index(location))
        obj = original(f, "cpu", *args, **kwargs)
        return tree_map(lambda x: _placed_on_cuda(x, ()), obj)

    patches.set(torch, "load", load)
    patches.set(torch.serialization, "load", load)


def _patch_cudnn(patches: _Patches) -> None:
    # cudnn is not emulated: modules that ask (nn.LSTM...) take their native path
    original = torch.backends.cudnn.is_acceptable

    def is_acceptable(tensor: torch.Tensor) -> bool:
        return not isinstance(tensor, FakeCudaTensor) and original(tensor)

    patches.set(torch.backends.cudnn, "is_acceptable", is_acceptable)


def _patch_shallow_copy_check(patches: _Patches) -> None:
    # Module._apply must never `param.data = other` between a plain tensor and a look-alike
    # (C++ would take the wrapper for a plain tensor: a crash); it makes a new Parameter instead
    original = torch._has_compatible_shallow_copy_type

    def compatible(a: torch.Tensor, b: torch.Tensor) -> bool:
        return isinstance(a, FakeCudaTensor) == isinstance(b, FakeCudaTensor) and original(a, b)

    patches.set(torch, "_has_compatible_shallow_copy_type", compatible)


def _apply_patches(patches: _Patches, devices: int) -> None:
    for name, fn in _cuda_stand_ins(devices).items():
        patches.set(torch.cuda, name, fn)
    for name, fn in _accelerator_stand_ins(devices).items():
        patches.set(torch.accelerator, name, fn)
    patches.set(torch.Tensor, "pin_memory", _pin_memory)
    patches.set(torch.Tensor, "is_pinned", _is_pinned)
    _patch_shallow_copy_check(patches)
    _patch_cudnn(patches)
    _patch_load(patches)
    _patch_onnx(patches)
    if devices:  # without a GPU, cuda autocast warns and disables itself, as on a real machine
        _patch_autocast(patches)


def _patch_onnx(patches: _Patches) -> None:
    """torch.onnx.export (TorchScript exporter) runs with the modes set aside: its C++ graph passes
    call aten ops with boxed arguments that a Python mode cannot take back. It sees CPU tensors only
    (evaluate.py exports on the CPU), which the modes leave alone anyway."""
    from torch.utils._python_dispatch import _disable_current_modes

    real = torch.onnx.export

    def export(*args: Any, **kwargs: Any) -> Any:
        with _disable_current_modes(), torch._C.DisableTorchFunction():
            return real(*args, **kwargs)
    patches.set(torch.onnx, "export", export)


# ----------------------------------------------------------------------------- entry points

@contextlib.contextmanager
def fake_cuda(devices: int = 1) -> Iterator[torch.device | None]:
    """Emulate `devices` (0 or 1) CUDA devices on the CPU until the block ends.

    Yields torch.device("cuda", 0), or None for devices=0 (a machine without a GPU). Not
    re-entrant; everything it changes is restored on exit. Enter and leave it in one thread."""
    global _devices
    if devices not in (0, 1):
        raise ValueError(f"fake_cuda emulates 0 or 1 devices, not {devices}")
    if _devices is not None:
        raise RuntimeError("fake_cuda() is already active")
    # torch._dynamo (which the first optimizer imports) records torch.cuda's functions by
    # identity on import: let it see the real ones, not our stand-ins
    import torch._dynamo  # noqa: F401
    patches = _Patches()
    _devices = devices
    try:
        _apply_patches(patches, devices)
        with _FakeCudaMode(), _PlacementMode():
            yield CUDA0 if devices else None
    finally:
        patches.restore()
        _devices = None


try:
    import pytest
except ImportError:  # the command line does not need pytest
    pytest = None

if pytest is not None:
    @pytest.fixture
    def fake_cuda_device() -> Iterator[torch.device]:
        """The test runs with one look-alike GPU; the value is torch.device("cuda", 0)."""
        with fake_cuda() as device:
            yield device


def main(argv: list[str] | None = None) -> int:
    """python tests/fake_cuda.py SCRIPT.py [ARGS...]: run SCRIPT as __main__ under fake_cuda(),
    with sys.argv = [SCRIPT.py, ARGS...]. The script's exit status is the command's."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(main.__doc__)
        return 0 if argv else 2
    script = argv[0]
    sys.argv = list(argv)
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python SCRIPT.py` would have it
    with fake_cuda():
        runpy.run_path(script, run_name="__main__")  # its SystemExit propagates
    return 0


if __name__ == "__main__":
    # run from the module imported as "fake_cuda" (the script replaces __main__), so that the
    # script, or anything it imports, shares this emulation's state
    import fake_cuda as _module

    sys.exit(_module.main())
