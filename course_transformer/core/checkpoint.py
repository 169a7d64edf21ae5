"""Safe checkpoint loading: safetensors only, checked against the config before any weight is used.

A pickle file (`pytorch_model.bin`, `*.pt`, ...) can run arbitrary code when it is unpickled, so nothing here
ever unpickles: such files are refused by name and by their first bytes. A safetensors file is read with
`safetensors.safe_open`, which checks its whole layout from the header; when it refuses a file, the header is read
once more to say why in words that name the file and the key (a truncated download is reported as truncated).

`validate_checkpoint_folder` compares every stored tensor with the model that `config.json` describes (built on
the meta device, so no memory is spent): missing keys, unexpected keys and wrong shapes are each reported with
the file and the key. transformers' own `from_pretrained` is more forgiving: it *loads* a checkpoint with
missing keys (re-initialising them at random, with a logged table) and ignores unexpected keys; see
`docs/publishing.md` for what it does in each case.

    >>> from course_transformer.core.checkpoint import validate_checkpoint_folder, load_checkpoint_state
    >>> summary = validate_checkpoint_folder("outputs/tiny-decoder")  # doctest: +SKIP
    >>> state = load_checkpoint_state("outputs/tiny-decoder/model.safetensors")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modeling.presets import read_json_object

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
# File names of pickled checkpoints (torch.save, pickle): refused, never opened beyond their first bytes.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# safetensors dtype names -> bytes per element, to name the tensor whose byte count is wrong in a refused file
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit
MAX_LISTED = 10  # problems listed in one error message


class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be loaded safely; the message names the file and the key."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


@dataclass
class CheckpointSummary:
    """What `validate_checkpoint_folder` found: the files read, the tensors and their parameter count."""

    folder: Path
    model_class: str
    files: list[str]
    tensors: dict[str, TensorInfo]
    ignored_files: list[str] = field(default_factory=list)

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(info.shape) for info in self.tensors.values())


def _looks_pickled(head: bytes) -> bool:
    # pickle protocol >= 2 starts with the PROTO opcode 0x80; torch.save's default format is a zip archive.
    return head[:1] == b"\x80" or head[:4] == b"PK\x03\x04"


def refuse_pickle(path: Path) -> None:
    raise CheckpointError(
        f"{path}: refusing to load a pickle checkpoint (unpickling can run arbitrary code); "
        "convert it to safetensors in a trusted environment (model.save_pretrained(folder) writes model.safetensors)"
    )


def _refuse_unsafe(path: Path) -> None:
    """A missing file, or a pickle by its name or its first bytes, before any reader touches it."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        refuse_pickle(path)
    with path.open("rb") as f:
        if _looks_pickled(f.read(4)):
            refuse_pickle(path)


def read_safetensors_header(path: str | Path) -> dict[str, TensorInfo]:
    """Tensor names, dtypes and shapes of a safetensors file, read by `safetensors.safe_open` (header only).

    safe_open checks the whole layout (header length, JSON, every tensor's offsets against its shape and dtype,
    the data covering the file exactly). Raises `CheckpointError` for a pickle, a truncated or corrupt file.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    _refuse_unsafe(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {key: f.get_slice(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
            return {key: TensorInfo(s.get_dtype(), tuple(s.get_shape())) for key, s in slices.items()}
    except SafetensorError as error:
        raise CheckpointError(explain_refusal(path) or f"{path}: not a safetensors file ({error})") from None


def explain_refusal(path: Path) -> str | None:
    """Why safetensors refused `path`, naming the file and the key, or None when no reason is found here.

    Read only after safe_open has refused the file: its errors ("invalid header length", "incomplete metadata,
    file not fully covered", "invalid shape, data type, or offset for tensor") say neither that the file is
    truncated nor which tensor is wrong, and a truncated download is the common case worth naming.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path}: truncated safetensors file ({size} bytes, less than its 8-byte header)"
        header_len = int.from_bytes(head, "little")  # the format: u64 little-endian header length, then JSON
        if header_len > MAX_HEADER_BYTES:
            return f"{path}: not a safetensors file (header length {header_len} is implausible)"
        if 8 + header_len > size:
            return f"{path}: truncated safetensors file: the header needs {header_len} bytes, only {size - 8} remain"
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"{path}: not a safetensors file (corrupt JSON header: {error})"
    if not isinstance(header, dict):
        return f"{path}: not a safetensors file (the header is not a JSON object)"
    return _explain_entries(path, header, size - 8 - header_len)


def _explain_entries(path: Path, header: dict, data_size: int) -> str | None:
    """The first tensor entry of `header` that is corrupt, lies beyond the data, or has the wrong byte count."""
    end_max = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(n) for n in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            return f"{path}: corrupt header entry for key {key!r}: {entry!r}"
        if dtype not in DTYPE_SIZES:
            return f"{path}: key {key!r} has unknown dtype {dtype!r}"
        if end > data_size:
            return (
                f"{path}: truncated safetensors file: key {key!r} needs bytes {begin}..{end} of the data, "
                f"the file holds only {data_size}"
            )
        if end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
            return f"{path}: key {key!r}: {end - begin} bytes stored for shape {shape} {dtype}"
        end_max = max(end_max, end)
    if end_max != data_size:
        return f"{path}: corrupt safetensors file: {data_size - end_max} bytes after the last tensor are not covered"
    return None


def load_checkpoint_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file (on CPU), after `read_safetensors_header`'s checks. Never unpickles."""
    from safetensors.torch import load_file

    path = Path(path)
    read_safetensors_header(path)
    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # safetensors raises its own error type; report it with the file name
        raise CheckpointError(f"{path}: cannot read safetensors file: {error}") from None


def weight_files(folder: str | Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a folder (one file or the shards of an index) and the index's weight map."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise CheckpointError(f"{index}: corrupt index ({error})") from None
        return [folder / name for name in sorted(set(weight_map.values()))], weight_map
    single = folder / SAFE_WEIGHTS_NAME
    if single.is_file():
        return [single], None
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        refuse_pickle(folder / pickled[0])
    raise CheckpointError(f"{folder}: no {SAFE_WEIGHTS_NAME} (or {SAFE_WEIGHTS_INDEX_NAME}) in this folder")


def read_config(folder: str | Path):
    """The folder's `config.json` as a validated `CourseTransformerConfig`; errors name the file."""
    from modeling.configuration_course_transformer import CourseTransformerConfig

    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a saved model folder has config.json)")
    fields = read_json_object(path, CheckpointError)
    model_type = fields.get("model_type")
    if model_type != CourseTransformerConfig.model_type:
        raise CheckpointError(
            f"{path}: model_type={model_type!r}, expected {CourseTransformerConfig.model_type!r} "
            "(convert other models with `course-transformer convert`)"
        )
    try:
        return CourseTransformerConfig.from_dict(fields)
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{path}: {error}") from None


def model_class_for(config, name: str | None = None) -> type:
    """The head class named by `config.architectures` (or `name`), else the LM head of the architecture."""
    import modeling

    default = {
        "decoder": "CourseTransformerForCausalLM",
        "encoder": "CourseTransformerForMaskedLM",
        "encoder-decoder": "CourseTransformerForSeq2SeqLM",
    }[config.architecture]
    name = name or (config.architectures or [default])[0]
    cls = getattr(modeling, name, None)
    if not (isinstance(cls, type) and issubclass(cls, modeling.CourseTransformerPreTrainedModel)):
        raise CheckpointError(f"config.json: architectures names {name!r}, not a course Transformer model class")
    return cls


def expected_shapes(config, model_class: type) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor a checkpoint of `model_class(config)` stores (tied copies are stored once)."""
    with torch.device("meta"):
        model = model_class(config)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    return {key: tuple(t.shape) for key, t in model.state_dict().items() if key not in tied}


def _problem_list(kind: str, items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    more = f" (and {len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return f"{kind} {shown}{more}"


def validate_checkpoint_folder(folder: str | Path, model_class: type | str | None = None) -> CheckpointSummary:
    """Check a saved model folder without loading any weight into a model.

    Reads `config.json` (validated), then every safetensors header (complete, not pickled), and compares the
    stored tensors with the model the config describes: missing keys, unexpected keys and wrong shapes raise
    `CheckpointError` naming the file and the keys. Pickle files beside the safetensors are ignored (listed in
    `ignored_files`), never opened.
    """
    folder = Path(folder)
    files, weight_map = weight_files(folder)
    config = read_config(folder)
    cls = model_class if isinstance(model_class, type) else model_class_for(config, model_class)

    stored: dict[str, TensorInfo] = {}
    where: dict[str, str] = {}
    for path in files:
        for key, info in read_safetensors_header(path).items():
            if key in stored:
                raise CheckpointError(f"{path}: key {key!r} is also stored in {where[key]}")
            stored[key], where[key] = info, path.name
    if weight_map is not None:
        for key, name in weight_map.items():
            if where.get(key) != name:
                raise CheckpointError(f"{folder / SAFE_WEIGHTS_INDEX_NAME}: key {key!r} is not in {name}")

    expected = expected_shapes(config, cls)
    problems = []
    missing = sorted(set(expected) - set(stored))
    if missing:
        problems.append(_problem_list("missing keys", missing))
    unexpected = sorted(set(stored) - set(expected))
    if unexpected:
        problems.append(_problem_list("unexpected keys", unexpected))
    wrong = [
        f"{key} has shape {list(stored[key].shape)} but the config expects {list(shape)}"
        for key, shape in sorted(expected.items())
        if key in stored and stored[key].shape != shape
    ]
    if wrong:
        problems.append(_problem_list("wrong shapes:", wrong))
    if problems:
        names = ", ".join(sorted(set(where.values()))) or SAFE_WEIGHTS_NAME
        summary = "; ".join(problems)
        raise CheckpointError(f"{folder / names}: does not match {cls.__name__}({CONFIG_NAME}): {summary}")

    ignored = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    return CheckpointSummary(folder, cls.__name__, [p.name for p in files], stored, ignored)


def load_pretrained_safely(folder: str | Path, model_class: type | str | None = None, **kwargs):
    """`validate_checkpoint_folder`, then `from_pretrained(..., use_safetensors=True)` of the right class."""
    summary = validate_checkpoint_folder(folder, model_class)
    cls = model_class if isinstance(model_class, type) else model_class_for(read_config(folder), summary.model_class)
    return cls.from_pretrained(folder, use_safetensors=True, **kwargs)


__all__ = [
    "CheckpointError",
    "CheckpointSummary",
    "TensorInfo",
    "expected_shapes",
    "load_checkpoint_state",
    "load_pretrained_safely",
    "model_class_for",
    "read_config",
    "read_safetensors_header",
    "validate_checkpoint_folder",
    "weight_files",
]
