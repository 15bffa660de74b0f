"""Saving and loading `torch.export` programs (`.pt2`) without pickle: kernels and models.

Any service that loads a compiled kernel (the trainer grafts it, the router
serves a model that holds it) uses `load_kernel`; the compiler and whoever
exports a whole model (`model.pt2`) write archives with `save_program`. This
module needs only torch, the standard library and `common.errors`.

What torch 2.13 stores, and why no artifact goes through pickle
---------------------------------------------------------------

`torch.export.save` writes a zip archive (PT2 archive format): the graph as
JSON (`models/model.json`), each parameter and buffer as raw storage bytes
(`data/weights/weight_<n>`) described by JSON tensor metadata
(`data/weights/model_weights_config.json`: dtype, sizes, strides, device,
requires_grad, `"use_pickle": false`), tensor constants the same way
(`data/constants/...`), extra files as text (`extra/<name>`), and the example
inputs given to `torch.export.export` as a `torch.save` pickle
(`data/sample_inputs/model.pt`). Plain tensors are never pickled; only tensor
subclasses (`"use_pickle": true`, read back with
`torch.load(weights_only=False)`), script/opaque objects (`pickle.loads`) and
the example inputs are. `torch.export.load` reads the example inputs with
`torch.load(weights_only=True)` and, when that fails, falls back to
`weights_only=False`: a full unpickle, driven by the archive's bytes.

The rule, for kernels and for the trainer's `model.pt2` alike:

- **`example_inputs = None` when saving.** The sample-inputs entry is then
  empty and `torch.export.load` skips it. `save_program` does this (and drops
  source paths from the graph, so the same program gives the same bytes on any
  machine); an archive saved the default way is refused by `check_archive`.
- **Plain tensors only**: no tensor subclasses, script or opaque objects,
  compiled AOTInductor code. Extra files are JSON text (`extra/<name>.json`).
- **Nothing is parsed before it is checked**: the sha256 of the bytes must
  match the one recorded when they were written (the compiler's
  `artifact_sha256`, the registry's manifest), then `check_archive` makes sure
  the archive holds exactly the entries above with no pickled payload, failing
  closed on anything else. Only then does `torch.export.load` see the bytes.

No separate safetensors file is needed for a kernel: its weights are raw bytes
in the archive already.

Loaded kernels
--------------

`ExportedProgram.module()` returns a `GraphModule` whose parameters are
ordinary `nn.Parameter`s with `requires_grad=True`: it trains as is.
`load_kernel` also `streamline`s it, which removes what makes it slower than
the eager module and fixes what makes it awkward to graft:

- its forward pre-hooks check input constraints in Python on every call and
  its forward flattens/unflattens pytrees: together about 70% overhead on a
  small kernel (forward+backward at batch 64); the plain code generator and no
  hooks bring it back to eager speed (`python -m bench compiler`);
- its `train()`/`eval()` raise `NotImplementedError`, so `host.eval()` would
  fail as soon as a kernel is grafted. They are restored as plain flag setters:
  the graph's own mode (batch-norm statistics) is fixed when it is exported,
  and the mode a kernel was compiled in is in its `extra/kernel.json`.
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

from common.errors import IntegrityError

__all__ = [
    "KERNEL_INFO_FILE",
    "check_archive",
    "kernel_info",
    "load_kernel",
    "load_program",
    "save_program",
    "sha256_hex",
    "streamline",
]

KERNEL_INFO_FILE: Final = "kernel.json"
"""Name of the JSON entry (under the archive's `extra/`) that describes a kernel."""

_EXTRA_FILE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\.json")
_ALLOWED_ENTRIES: Final = re.compile(
    r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/model\.json|data/sample_inputs/model\.pt"
    r"|data/weights/model_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+"
    r"|extra/" + _EXTRA_FILE.pattern + ")"
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


def save_program(
    program: torch.export.ExportedProgram, *, extra_files: Mapping[str, str] | None = None
) -> bytes:
    """The `.pt2` bytes of `program`, written in memory the way `check_archive` accepts.

    The archive carries no example inputs (the program's `example_inputs` are
    put back afterwards) and no source paths (the graph's `stack_trace`
    metadata is dropped, in place), so the same program gives the same bytes
    wherever it is saved. `extra_files` maps names like `manifest.json` to JSON
    text, stored as `extra/<name>`; any other name is a `ValueError`. A program
    holding tensor subclasses or script objects is saved, but refused on load.
    """
    extra = dict(extra_files or {})
    for name in extra:
        if not _EXTRA_FILE.fullmatch(name):
            raise ValueError(f"extra file name {name!r} must look like 'name.json'")
    for node in program.graph.nodes:
        # Source paths of this machine; they would make the bytes depend on the install.
        node.meta.pop("stack_trace", None)
    saved_inputs = program.example_inputs
    # Saved example inputs are a pickle that `torch.export.load` unpickles.
    program.example_inputs = None
    try:
        # A path would be embedded in the archive; a buffer keeps the bytes reproducible.
        buffer = io.BytesIO()
        torch.export.save(program, buffer, extra_files=extra)
    finally:
        program.example_inputs = saved_inputs
    return buffer.getvalue()


def check_archive(data: bytes) -> None:
    """Refuse (`IntegrityError`) an archive that is not a plain, pickle-free program.

    Every entry must be one `save_program` writes; every weight and constant
    must be stored as raw bytes (`"use_pickle": false`) and the example inputs
    entry must be empty. Anything else (tensor subclasses, script or opaque
    objects, compiled AOTInductor code, unknown files) fails closed.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise IntegrityError(f"not a PT2 archive: {exc}") from exc
    with archive:
        infos = archive.infolist()
        roots = {info.filename.split("/", 1)[0] for info in infos}
        if len(roots) != 1:
            raise IntegrityError(f"PT2 archive has {len(roots)} top-level folders, expected 1")
        root = roots.pop() + "/"
        entries = {info.filename[len(root) :]: info for info in infos}
        for name in entries:
            if not _ALLOWED_ENTRIES.fullmatch(name):
                raise IntegrityError(f"PT2 archive holds an unexpected entry {name!r}")
        for name in _REQUIRED_ENTRIES:
            if name not in entries:
                raise IntegrityError(f"PT2 archive lacks {name!r}")
        sample = entries.get("data/sample_inputs/model.pt")
        if sample is not None and sample.file_size:
            raise IntegrityError("PT2 archive holds pickled example inputs")
        for config_name in _REQUIRED_ENTRIES[2:]:
            config = _read_json(archive, root + config_name)
            payloads = config.get("config") if isinstance(config, dict) else None
            if not isinstance(payloads, dict):
                raise IntegrityError(f"PT2 archive: {config_name} is malformed")
            for fqn, payload in payloads.items():
                if not isinstance(payload, dict) or payload.get("use_pickle") is not False:
                    raise IntegrityError(
                        f"PT2 archive stores {fqn!r} through pickle ({config_name})"
                    )
                path = str(payload.get("path_name", ""))
                if not re.fullmatch(r"(weight|tensor)_\d+", path):
                    raise IntegrityError(
                        f"PT2 archive: {fqn!r} is stored as {path!r}, not as a raw tensor"
                    )


def kernel_info(data: bytes) -> dict[str, Any]:
    """The `extra/kernel.json` of a kernel archive (what the compiler recorded about it)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = [n for n in archive.namelist() if n.endswith("/extra/" + KERNEL_INFO_FILE)]
            if len(names) != 1:
                raise IntegrityError(f"kernel archive lacks extra/{KERNEL_INFO_FILE}")
            info = _read_json(archive, names[0])
    except zipfile.BadZipFile as exc:
        raise IntegrityError(f"not a PT2 archive: {exc}") from exc
    if not isinstance(info, dict):
        raise IntegrityError(f"kernel archive: extra/{KERNEL_INFO_FILE} is not an object")
    return info


def _read_json(archive: zipfile.ZipFile, name: str) -> Any:
    try:
        return json.loads(archive.read(name))
    except (KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise IntegrityError(f"PT2 archive: {name} is not readable JSON") from exc


def _verify(data: bytes, expected_sha256: str) -> None:
    actual = sha256_hex(data)
    if not hmac.compare_digest(actual, expected_sha256.strip().lower()):
        raise IntegrityError(
            f"artifact checksum mismatch: expected sha256 {expected_sha256}, got {actual}"
        )
    check_archive(data)


# torch.export's (de)serializer keeps process-wide state (`_CURRENT_DESERIALIZER`):
# two loads at once on different threads fail. Hold this lock around any call into
# it (loading here; `ExportedProgram.module()` by callers).
EXPORT_LOCK = threading.Lock()


def _load_checked(data: bytes) -> torch.export.ExportedProgram:
    try:
        with EXPORT_LOCK:
            return torch.export.load(io.BytesIO(data))
    except Exception as exc:
        raise IntegrityError(f"PT2 archive does not load: {type(exc).__name__}: {exc}") from exc


def load_program(data: bytes, expected_sha256: str) -> torch.export.ExportedProgram:
    """The program in `data`, loaded only after its sha256 and `check_archive` pass.

    For whole models (`model.pt2`); kernels go through `load_kernel`. Raises
    `IntegrityError` on a checksum mismatch (before any parsing), on an archive
    `check_archive` refuses, and when torch cannot load it.
    """
    _verify(data, expected_sha256)
    return _load_checked(data)


def load_kernel(
    data: bytes, expected_sha256: str, *, device: torch.device | str | None = None
) -> torch.fx.GraphModule:
    """The trainable module of a kernel's bytes, checked before anything is parsed.

    The sha256 of `data` must equal `expected_sha256` (else `IntegrityError`,
    before any parsing), and the archive must pass `check_archive` and carry
    `extra/kernel.json`. The module maps (B, *slot) -> (B, *slot), its
    parameters require grad, and it is `streamline`d; `device` moves it after
    loading.
    """
    _verify(data, expected_sha256)
    info = kernel_info(data)
    program = _load_checked(data)
    with EXPORT_LOCK:
        module = streamline(program.module())
    module.train(bool(info.get("training", True)))
    if device is not None:
        module.to(device)
    return module


def streamline(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Make `ExportedProgram.module()` as fast as eager and graftable; returns `module`.

    Drops the forward hooks that re-check input constraints in Python on every
    call, generates plain code (no pytree flattening: the inputs are positional
    tensors, and forward returns the one output tensor instead of a 1-tuple),
    and gives back the ordinary `train()` and `eval()` (which only set the
    `training` flag: the graph's mode is fixed). For programs whose inputs are
    plain positional tensors, as every kernel's are.
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
