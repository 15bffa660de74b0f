"""Eager module -> portable kernel (`torch.export` program, `.pt2` bytes) and back.

What torch 2.13 stores, and why kernels never go through pickle
---------------------------------------------------------------

`torch.export.save` writes a zip archive (PT2 archive format): the graph as
JSON (`models/model.json`), each parameter and buffer as raw storage bytes
(`data/weights/weight_<n>`) described by JSON tensor metadata
(`data/weights/model_weights_config.json`: dtype, sizes, strides, device,
requires_grad, `"use_pickle": false`), tensor constants the same way, and the
example inputs given to `torch.export.export` as a `torch.save` pickle
(`data/sample_inputs/model.pt`). Plain tensors are never pickled; only tensor
subclasses (`"use_pickle": true`, read back with
`torch.load(weights_only=False)`), script/opaque objects (`pickle.loads`) and the
example inputs are. `torch.export.load` reads the example inputs with
`torch.load(weights_only=True)` and, when that fails, falls back to
`weights_only=False`: a full unpickle, driven by the archive's bytes.

So a kernel is saved with its example inputs removed (the sample-inputs entry is
then empty and `torch.export.load` skips it) and with plain tensors only; and
before anything is loaded, `check_archive` makes sure the archive holds exactly
the entries above with no pickled payload, failing closed on anything else.
`tests/unit/compiler/test_export.py` loads a kernel with every unpickling entry
point made to fail, and shows that the default `torch.export.save` output does
reach `torch.load`. No separate safetensors file is needed.

Loading without project code
----------------------------

`load_kernel` needs only torch and the standard library (its one import from
the project is the error classes), so a consumer can copy it or it can move to
`common/`: check the sha256, `check_archive`, `torch.export.load(...).module()`,
then `streamline`. `ExportedProgram.module()` returns a `GraphModule` whose
parameters are ordinary `nn.Parameter`s with `requires_grad=True`: it trains as
is. `streamline` removes what makes it slower than the eager module and fixes
what makes it awkward to graft:

- its forward pre-hooks check input constraints in Python on every call and its
  forward flattens/unflattens pytrees: together about 70% overhead on a small
  kernel (forward+backward at batch 64); the plain code generator and no hooks
  bring it back to eager speed (`bench/bench_compiler.py` prints both);
- its `train()`/`eval()` raise `NotImplementedError`, so `host.eval()` would
  fail as soon as a kernel is grafted. They are restored as plain flag setters:
  the graph's own mode (batch-norm statistics) is fixed when it is compiled,
  and the mode a kernel was compiled in is in `extra/kernel.json`.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import re
import threading
import zipfile
from collections.abc import Mapping
from typing import Any, Final

import torch
from torch import nn
from torch.export import Dim

from common.errors import IntegrityError

__all__ = [
    "FORMAT_VERSION",
    "KERNEL_INFO_FILE",
    "check_archive",
    "export_kernel",
    "kernel_id",
    "kernel_info",
    "load_kernel",
    "sha256_hex",
    "streamline",
]

FORMAT_VERSION: Final = 1
"""Bumped whenever building or exporting changes what a blueprint compiles to (it is in the id)."""

KERNEL_INFO_FILE: Final = "kernel.json"
"""Name of the JSON entry (under the archive's `extra/`) that describes the kernel."""

# torch.export keeps tracing state in globals; one export at a time per process.
_EXPORT_LOCK = threading.Lock()

_ALLOWED_ENTRIES: Final = re.compile(
    r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/model\.json|data/sample_inputs/model\.pt"
    r"|data/weights/model_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+"
    r"|extra/" + re.escape(KERNEL_INFO_FILE) + ")"
)
_REQUIRED_ENTRIES: Final = (
    "archive_format",
    "models/model.json",
    "data/weights/model_weights_config.json",
    "data/constants/model_constants_config.json",
)


def sha256_hex(data: bytes) -> str:
    """The lowercase hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def kernel_id(
    canonical_blueprint: str,
    slot: Mapping[str, Any],
    *,
    dtype: str,
    device: str,
    seed: int,
    training: bool,
) -> str:
    """The kernel's id: sha256 of everything that decides what the kernel is.

    That is the canonical blueprint (`canonical_json`), the target slot, this
    torch version, dtype, device, init seed, training or eval mode and
    `FORMAT_VERSION`; the same inputs give the same id before anything is
    compiled. (The sha256 of the artifact's bytes is separate: it checks integrity.)
    """
    payload = {
        "blueprint": json.loads(canonical_blueprint),
        "slot": dict(slot),
        "torch": torch.__version__,
        "dtype": dtype,
        "device": device,
        "seed": seed,
        "training": training,
        "format": FORMAT_VERSION,
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return sha256_hex(text.encode())


def export_kernel(
    module: nn.Module,
    example: torch.Tensor,
    *,
    training: bool,
    min_batch: int = 1,
    info: Mapping[str, Any] | None = None,
) -> bytes:
    """The `.pt2` bytes of `module`, with a dynamic batch dimension of at least `min_batch`.

    `example` is one input (any batch size >= 2 and >= `min_batch`; its values do
    not matter). The module is traced in training mode when `training` (batch
    norm uses and updates batch statistics) and in eval mode otherwise. `info`
    is stored as `extra/kernel.json`. The archive is built in memory: a `.pt2`
    written to a path embeds the file's name, and the same inputs must give the
    same bytes.
    """
    module.train(training)
    batch = Dim("batch", min=min_batch)
    with _EXPORT_LOCK:
        program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
        # Saved example inputs are a pickle that `torch.export.load` unpickles.
        program.example_inputs = None
        for node in program.graph.nodes:
            # Source paths of this machine; they would make the bytes depend on the install.
            node.meta.pop("stack_trace", None)
        buffer = io.BytesIO()
        extra = {KERNEL_INFO_FILE: json.dumps(dict(info or {}), sort_keys=True)}
        torch.export.save(program, buffer, extra_files=extra)
    return buffer.getvalue()


def check_archive(data: bytes) -> None:
    """Refuse (`IntegrityError`) an archive that is not a plain, pickle-free kernel.

    Every entry must be one `export_kernel` writes; every weight and constant
    must be stored as raw bytes (`"use_pickle": false`) and the example inputs
    entry must be empty. Anything else (tensor subclasses, script or opaque
    objects, compiled AOTInductor code, unknown files) fails closed.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise IntegrityError(f"kernel is not a PT2 archive: {exc}") from exc
    with archive:
        infos = archive.infolist()
        roots = {info.filename.split("/", 1)[0] for info in infos}
        if len(roots) != 1:
            raise IntegrityError(f"kernel archive has {len(roots)} top-level folders, expected 1")
        root = roots.pop() + "/"
        entries = {info.filename[len(root) :]: info for info in infos}
        for name in entries:
            if not _ALLOWED_ENTRIES.fullmatch(name):
                raise IntegrityError(f"kernel archive holds an unexpected entry {name!r}")
        for name in _REQUIRED_ENTRIES:
            if name not in entries:
                raise IntegrityError(f"kernel archive lacks {name!r}")
        sample = entries.get("data/sample_inputs/model.pt")
        if sample is not None and sample.file_size:
            raise IntegrityError("kernel archive holds pickled example inputs")
        for config_name in _REQUIRED_ENTRIES[2:]:
            config = _read_json(archive, root + config_name)
            payloads = config.get("config") if isinstance(config, dict) else None
            if not isinstance(payloads, dict):
                raise IntegrityError(f"kernel archive: {config_name} is malformed")
            for fqn, payload in payloads.items():
                if not isinstance(payload, dict) or payload.get("use_pickle") is not False:
                    raise IntegrityError(
                        f"kernel archive stores {fqn!r} through pickle ({config_name})"
                    )
                path = str(payload.get("path_name", ""))
                if not re.fullmatch(r"(weight|tensor)_\d+", path):
                    raise IntegrityError(
                        f"kernel archive: {fqn!r} is stored as {path!r}, not as a raw tensor"
                    )


def kernel_info(data: bytes) -> dict[str, Any]:
    """The `extra/kernel.json` of a kernel archive (what `export_kernel` got as `info`)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = [n for n in archive.namelist() if n.endswith("/extra/" + KERNEL_INFO_FILE)]
            if len(names) != 1:
                raise IntegrityError(f"kernel archive lacks extra/{KERNEL_INFO_FILE}")
            info = _read_json(archive, names[0])
    except zipfile.BadZipFile as exc:
        raise IntegrityError(f"kernel is not a PT2 archive: {exc}") from exc
    if not isinstance(info, dict):
        raise IntegrityError(f"kernel archive: extra/{KERNEL_INFO_FILE} is not an object")
    return info


def _read_json(archive: zipfile.ZipFile, name: str) -> Any:
    try:
        return json.loads(archive.read(name))
    except (KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise IntegrityError(f"kernel archive: {name} is not readable JSON") from exc


def load_kernel(
    data: bytes, expected_sha256: str, *, device: torch.device | str | None = None
) -> torch.fx.GraphModule:
    """The trainable module of a kernel's bytes, checked before anything is parsed.

    The sha256 of `data` must equal `expected_sha256` (else `IntegrityError`,
    before any parsing), and the archive must pass `check_archive`. The module
    maps (B, *slot) -> (B, *slot), its parameters require grad, and it is
    `streamline`d; `device` moves it after loading.
    """
    actual = sha256_hex(data)
    if not hmac.compare_digest(actual, expected_sha256.strip().lower()):
        raise IntegrityError(
            f"kernel checksum mismatch: expected sha256 {expected_sha256}, got {actual}"
        )
    check_archive(data)
    info = kernel_info(data)
    try:
        program = torch.export.load(io.BytesIO(data))
    except Exception as exc:
        raise IntegrityError(f"kernel archive does not load: {type(exc).__name__}: {exc}") from exc
    module = streamline(program.module())
    module.train(bool(info.get("training", True)))
    if device is not None:
        module.to(device)
    return module


def streamline(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Make `ExportedProgram.module()` as fast as eager and graftable; returns `module`.

    Drops the forward hooks that re-check input constraints in Python on every
    call, generates plain code (no pytree flattening; forward(x) returns the one
    output tensor instead of a 1-tuple), and gives back the ordinary `train()`
    and `eval()` (which only set the `training` flag: the graph's mode is fixed).
    """
    module._forward_pre_hooks.clear()
    module._forward_hooks.clear()
    module._forward_hooks_always_called.clear()
    graph = module.graph
    output = graph.output_node()
    (results,) = output.args
    if isinstance(results, tuple | list) and len(results) == 1:
        output.args = (results[0],)
    graph._codegen = torch.fx.graph.CodeGen()
    module.recompile()
    for name in ("train", "eval"):
        if name in vars(module):
            delattr(module, name)
    return module
