"""Reading and writing adapter folders safely: lazy tensors, no code execution, atomic output.

* Weights are read only through safetensors or ``torch.load(weights_only=True)`` (which refuses a
  pickle that would run code); both are opened lazily (safetensors: one tensor per read; torch's
  zip format: memory-mapped), so a merge reads one module at a time.
* An output folder is written into a temporary sibling and renamed into place when complete: an
  interrupted or failed run leaves no folder.
* An input that is not a local folder is resolved as a Hugging Face Hub id (``org/name`` or
  ``org/name@revision``) through ``huggingface_hub``, from its cache when ``HF_HUB_OFFLINE=1``.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import socket
import stat
import sys
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

import torch

from .._warnings import warn

PathLike = Union[str, "os.PathLike[str]"]


class InputError(ValueError):
    """A problem with an input folder or file (the message names it and says what to do)."""


# ----------------------------------------------------------------------------- lazy tensors
class LazyFile(Mapping):
    """{key: tensor} of one weights file, read on demand; ``dtype_of(key)`` without reading."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.suffix == ".safetensors":
            self._open_safetensors()
        else:
            self._open_pickle()

    def _open_safetensors(self) -> None:
        from safetensors import SafetensorError, safe_open

        try:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            self._keys = list(self._handle.keys())
            slices = {k: self._handle.get_slice(k) for k in self._keys}
            self._dtypes = {k: _SAFETENSORS_DTYPES.get(v.get_dtype()) for k, v in slices.items()}
            self._shapes = {k: tuple(v.get_shape()) for k, v in slices.items()}
        except (SafetensorError, OSError, ValueError) as error:
            raise InputError(f"{self.path} is not a readable safetensors file ({error}): re-save or re-download it.") from None
        self._tensors: Optional[Dict[str, torch.Tensor]] = None

    def _open_pickle(self) -> None:
        try:
            with warnings.catch_warnings():  # torch's notes about pickle protocols are not the user's concern
                warnings.simplefilter("ignore")
                try:
                    tensors = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
                    tensors = torch.load(self.path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            why = next((line for line in lines if "Unsupported" in line or "global" in line.lower()), lines[0] if lines else "")
            raise InputError(
                f"{self.path} was refused: it is a pickle that would run code or load objects other than tensors "
                f"({why[:160]}). Only safetensors files and plain tensor pickles are read; convert it to "
                "safetensors where it came from, if you trust it."
            ) from None
        except Exception as error:  # a truncated or corrupted file
            raise InputError(f"{self.path} is not a readable weights file ({type(error).__name__}: {error}).") from None
        if not isinstance(tensors, Mapping) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise InputError(f"{self.path} does not hold a dict of tensors (a state dict).")
        self._tensors = dict(tensors)
        self._keys = list(self._tensors)
        self._dtypes = {k: t.dtype for k, t in self._tensors.items()}
        self._shapes = {k: tuple(t.shape) for k, t in self._tensors.items()}

    def __getitem__(self, key: str) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[key]
        if key not in self._dtypes:
            raise KeyError(key)
        return self._handle.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def dtype_of(self, key: str) -> torch.dtype:
        return self._dtypes[key]

    def shape_of(self, key: str) -> Tuple[int, ...]:
        return self._shapes[key]


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class Renamed(Mapping):
    """A lazy mapping seen through new keys: {new key: source[old key]}, with ``dtype_of``."""

    def __init__(self, source: Mapping, keys: Mapping, transform: Optional[Callable] = None) -> None:
        self.source, self.keys_map, self.transform = source, dict(keys), transform

    def __getitem__(self, key):
        tensor = self.source[self.keys_map[key]]
        return self.transform(key, tensor) if self.transform else tensor

    def __iter__(self):
        return iter(self.keys_map)

    def __len__(self) -> int:
        return len(self.keys_map)

    def dtype_of(self, key) -> torch.dtype:
        source_dtype = getattr(self.source, "dtype_of", None)
        return source_dtype(self.keys_map[key]) if source_dtype else self.source[self.keys_map[key]].dtype


def placed(tensors: Mapping, device: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> Mapping:
    """``tensors`` read onto ``device`` and, for floating tensors, in ``dtype`` (None: as stored)."""
    if device is None and dtype is None:
        return tensors

    def move(key, tensor: torch.Tensor) -> torch.Tensor:
        wanted = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        return tensor.to(device=device or tensor.device, dtype=wanted)

    placed_ = Renamed(tensors, {k: k for k in tensors}, move)
    if dtype is not None:
        original = placed_.dtype_of
        placed_.dtype_of = lambda key: dtype if original(key).is_floating_point else original(key)  # type: ignore[method-assign]
    return placed_


_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> None:
    """Write ``tensors`` in the safetensors format one tensor at a time (``safetensors.torch.save_file``
    first copies every tensor into one buffer, doubling the output's memory). The format: an 8-byte
    little-endian header length, a JSON header of dtypes, shapes and byte offsets, then the raw data."""
    header: Dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key in sorted(tensors):
        tensor = tensors[key]
        size = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": _SAFETENSORS_NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for key in sorted(tensors):
            data = tensors[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            handle.write(memoryview(data.numpy()))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def first_existing(folder: Path, names: Sequence[str]) -> Optional[Path]:
    return next((folder / n for n in names if (folder / n).is_file()), None)


# ----------------------------------------------------------------------------- inputs: folders or Hub ids
def resolve_folder(source: PathLike) -> Tuple[Path, str]:
    """(local folder, how it was given) of an input: a folder, or a Hub id resolved to its snapshot."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return path, text
    if path.exists():
        raise InputError(f"{text} is a file, not an adapter folder: pass the folder that holds adapter_config.json.")
    repo_id, _, revision = text.partition("@")
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".", "~")) or os.sep in repo_id.replace("/", "", 1):
        raise InputError(f"{text} is not a folder (and not a Hugging Face Hub id like 'org/name'): check the path.")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            repo_id, revision=revision or None,
            allow_patterns=["*.json", "*.safetensors", "*.bin"],
        )
    except Exception as error:  # offline and not cached, unknown repo, no network
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        where = "in the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "on the Hugging Face Hub"
        raise InputError(
            f"{text} is not a folder and could not be found {where}: {type(error).__name__}. Pass a local folder, "
            "or download the adapter first (huggingface-cli download …)."
        ) from None
    return Path(local), text


def hub_commit(folder: Path) -> Optional[str]:
    """The commit of a Hugging Face cache snapshot (``…/snapshots/<40 hex digits>``), else None."""
    name = folder.name
    if folder.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", name):
        return name
    return None


def check_distinct(folders: Sequence[Tuple[Path, str]]) -> None:
    """Refuse one folder given twice under different spellings (``pa``, ``./pa``, a link to it, a Hub
    id whose snapshot it is): it would merge as two adapters (``[1, -1]`` would give zero)."""
    seen: Dict[Path, str] = {}
    for folder, given in folders:
        real = real_path(folder)
        if real in seen:
            raise InputError(
                f"Duplicate adapter names {[seen[real], given]}: both are the folder {real}, and each adapter may "
                "appear once. To give one more weight, pass a single entry with the summed weight."
            )
        seen[real] = given


# ----------------------------------------------------------------------------- the output folder
def real_path(path: Path) -> Path:
    """``path`` with every symbolic link and ``..`` resolved (it need not exist)."""
    return Path(os.path.realpath(os.fspath(path)))


def output_target(output: Path) -> Path:
    """Where ``output`` is written: itself, or the folder its symbolic link points to (the link stays).
    A link that leads nowhere (dangling, or a loop) is refused in one line."""
    if os.path.lexists(output) and not os.path.exists(output):
        try:
            points_to = os.readlink(output)
        except OSError:
            points_to = "?"
        raise InputError(
            f"The output {output} is a symbolic link to {points_to}, which does not exist (or is a loop): "
            "create the folder it points to, or remove the link."
        )
    return real_path(output)


def _relation(output: Path, folder: Path) -> Optional[str]:
    if output == folder:
        return "is"
    if output in folder.parents:
        return "contains"
    if folder in output.parents:
        return "lies inside"
    return None


def check_output(output: Path, overwrite_ok: bool, inputs: Sequence[Path]) -> Path:
    """Refuse a non-empty existing output (unless ``overwrite_ok``), a file, a dangling link, and an
    output that is, contains or lies inside an input (or holds one of its files), comparing real paths
    (links resolved), whatever ``overwrite_ok`` says. Returns the real folder to write."""
    target = output_target(output)
    if target.exists() and not target.is_dir():
        raise InputError(f"The output {output} is a file: pass a folder (it is created).")
    for folder in inputs:
        real = real_path(folder)
        candidates = [real] + [real_path(entry) for entry in _entries(folder) if entry.is_symlink()]
        for candidate in candidates:
            relation = _relation(target, candidate)
            if relation is None:
                continue
            if candidate != real:
                what = f"{relation} the file {candidate} of the input {folder}"
            else:
                what = f"is one of the inputs ({folder})" if relation == "is" else f"{relation} the input {folder}"
            raise InputError(
                f"The output {output} {what}: writing it would replace or change that input, also with "
                "overwrite_ok (--force). Choose a folder outside every input (inputs are never modified)."
            )
    if target.is_dir() and any(target.iterdir()) and not overwrite_ok:
        raise InputError(
            f"The output folder {output} exists and is not empty. Pass overwrite_ok=True (--force on the command "
            "line) to replace it, or choose another folder."
        )
    return target


def _entries(folder: Path) -> list:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


# A run's temporary folders beside its output: ".NAME.partial-HOST-PID-RANDOM" while it writes, and (where the
# file system cannot swap two folders atomically) ".NAME.old-HOST-PID-RANDOM" for the replaced output while it
# is deleted. HOST is 8 hex digits of a hash of the machine's name, PID the writing process.
STALE_AGE_S = 24 * 3600


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def _name_tag(name: str) -> str:
    # keep the temporary names within the usual 255-byte limit of a file name
    return name if len(name.encode("utf-8")) <= 160 else hashlib.sha256(name.encode("utf-8")).hexdigest()[:16]


def temporary_name(output: Path, kind: str) -> str:
    """The name of a temporary folder of this process beside ``output`` (``kind``: "partial" or "old")."""
    return f".{_name_tag(output.name)}.{kind}-{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # someone else's live process
        return True
    return True


def _last_modified(folder: Path) -> float:
    times = [folder.lstat().st_mtime]
    for entry in _entries(folder):
        try:
            times.append(entry.lstat().st_mtime)
        except OSError:
            pass
    return max(times)


def stale_folders(output: Path, kinds: Sequence[str] = ("partial", "old")) -> list:
    """Temporary folders of earlier runs for ``output`` (beside it, named exactly as `temporary_name`
    names them, or as earlier versions did) whose run is over: made on this machine by a process
    that no longer runs, or — where that cannot be told (another machine, an older version's name) —
    not modified for `STALE_AGE_S` seconds. A live run's folders are never listed."""
    name = re.escape(_name_tag(output.name))
    kinds_ = "|".join(kinds)
    ours = re.compile(rf"\.{name}\.({kinds_})-(?P<host>[0-9a-f]{{8}})-(?P<pid>[0-9]{{1,10}})-[0-9a-f]{{8}}")
    legacy = re.compile(rf"\.{name}\.({kinds_})-[a-z0-9_]{{8}}")
    host, now, stale = _host_tag(), time.time(), []
    for entry in _entries(output.parent):
        match = ours.fullmatch(entry.name)
        if not (match or legacy.fullmatch(entry.name)) or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            if match and match["host"] == host:
                if not _pid_alive(int(match["pid"])):
                    stale.append(entry)
            elif now - _last_modified(entry) > STALE_AGE_S:
                stale.append(entry)
        except OSError:
            continue
    return sorted(stale)


def remove_stale(output: Path, kinds: Sequence[str] = ("partial", "old")) -> list:
    """Remove `stale_folders` of ``output``; returns the names of those removed."""
    removed = []
    for folder in stale_folders(output, kinds):
        shutil.rmtree(folder, ignore_errors=True)
        if not os.path.lexists(folder):
            removed.append(folder.name)
    return removed


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextmanager
def atomic_folder(output: Path, overwrite_ok: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``output`` (a real path: see `check_output`); when the block
    completes, it becomes ``output`` (replacing an existing one only with ``overwrite_ok``). On any
    failure — an exception or an interrupt — the temporary folder is removed and ``output`` is as it
    was; a run killed outright leaves its temporary folder, which the next run for ``output`` removes
    (`remove_stale`).

    The output folder gets the mode ``mkdir`` gives (the umask's), or keeps an existing output's mode;
    the files in it are created under the umask as usual. Where the system can swap two folders
    atomically (Linux), an existing output is exchanged with the new one in one step."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(temporary_name(output, "partial"))
    os.mkdir(staging)  # under the umask, as the output will be
    try:
        yield staging
        if output.is_dir():  # keep an existing output's mode (a new one has mkdir's, as staging)
            os.chmod(staging, stat.S_IMODE(output.stat().st_mode))
        if output.is_dir() and any(output.iterdir()):
            if not overwrite_ok:  # appeared while we were merging
                raise InputError(f"The output folder {output} was filled while merging; nothing was written.")
            if not _exchange(staging, output):
                old = output.with_name(temporary_name(output, "old"))
                os.replace(output, old)
                try:
                    os.replace(staging, output)
                except BaseException:
                    os.replace(old, output)
                    raise
                shutil.rmtree(old, ignore_errors=True)
                if os.path.lexists(old):
                    warn(f"The replaced output could not be removed entirely: {old} is left; delete it by hand.")
        else:
            if output.is_dir():
                output.rmdir()
            os.replace(staging, output)
    finally:
        if os.path.lexists(staging):
            shutil.rmtree(staging, ignore_errors=True)
    remove_stale(output, ("old",))
