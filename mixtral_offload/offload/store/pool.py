"""The expert pool of a converted model: `experts.pool` (header + one block per expert) and `manifest.json`.

File layout (see docs/pool-format.md):

    [0, 4096)           header: magic, format version, alignment, pool bytes, manifest length and crc32
    [4096, ...)         one block per (layer, expert), in (layer, expert) order, each starting on a
                        4 KiB page: w1, w3, w2 parts (codes, scales[, zeros]) back to back, each part
                        64-byte aligned inside the block; zero padding up to the next page.

The manifest holds the quantization spec, the expert shapes and, per block, its offset, size, part
table and crc32. `ExpertPool.open` checks all of it against the file and config.json before it makes
a single view. The pool holds no caching policy: it is a cache.source.BlockSource (extents + views).
"""
from __future__ import annotations

import mmap
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...cache.reader import populate_mapping
from ...cache.source import MATRICES, PAGE, Extent, Key
from ...config import ModelArgs
from ...errors import MixtralOffloadError
from ...validate import MANIFEST_LIMIT, check_no_loop, open_regular, parse_json, read_json_object, read_regular, require_size
from ...quant.format import QuantizedMatrix, QuantSpec, part_layout
from .checkpoint import expert_shapes
from .digests import check_digests, parse_digests

FORMAT_VERSION = 1
POOL_NAME, MANIFEST_NAME, CONFIG_NAME, DENSE_NAME = "experts.pool", "manifest.json", "config.json", "dense.safetensors"
TOKENIZER_NAME = "tokenizer.model"
# A pool may carry a second, low-bit copy of every expert (convert/synth --miss-bits) in the same
# format, beside the first: copy name -> (pool file, manifest file).
COPIES = {"full": (POOL_NAME, MANIFEST_NAME), "miss": ("experts.miss.pool", "manifest.miss.json")}
CHECKED_FILES = (CONFIG_NAME, DENSE_NAME, TOKENIZER_NAME)  # sha256 in the manifest's 'files' (digests.py)
HASHED_AT_LOAD = (CONFIG_NAME, TOKENIZER_NAME)  # small; at load dense.safetensors' size only, `verify` hashes it
PART_ALIGN = 64           # part alignment inside a block: a cache line, for the kernels' loads

MAGIC = b"MXOPOOL\x00"
# magic, format version, alignment, pool bytes, manifest bytes, manifest crc32
_HEADER = struct.Struct("<8sIIQQI")


@dataclass(frozen=True)
class PartSlot:
    """Where one part of one matrix lies inside a block."""

    matrix: str          # w1, w3 or w2
    name: str            # codes, scales or zeros
    offset: int          # bytes from the block's start
    dtype: np.dtype
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * self.shape[0] * self.shape[1]

    def to_dict(self) -> dict:
        return {"offset": self.offset, "dtype": self.dtype.name, "shape": list(self.shape)}


def block_layout(spec: QuantSpec, shapes: dict[str, tuple[int, int]]) -> tuple[list[PartSlot], int]:
    """The part slots of one expert block and the block's byte size (before page padding)."""
    slots, offset = [], 0
    for matrix in MATRICES:
        for name, (dtype, shape) in part_layout(spec, shapes[matrix]).items():
            slot = PartSlot(matrix, name, offset, np.dtype(dtype), tuple(shape))
            slots.append(slot)
            offset = align(offset + slot.nbytes, PART_ALIGN)
    return slots, offset


def align(value: int, to: int) -> int:
    return -(-value // to) * to


def pack_header(pool_bytes: int, manifest: bytes) -> bytes:
    """The pool's first page."""
    raw = _HEADER.pack(MAGIC, FORMAT_VERSION, PAGE, pool_bytes, len(manifest), zlib.crc32(manifest))
    return raw.ljust(PAGE, b"\0")


def block_views(buffer, base: int, slots: list[PartSlot], spec: QuantSpec,
                shapes: dict[str, tuple[int, int]]) -> tuple[QuantizedMatrix, ...]:
    """(w1, w3, w2) as zero-copy QuantizedMatrix views of the block at byte `base` of buffer."""
    parts: dict[str, dict[str, np.ndarray]] = {m: {} for m in MATRICES}
    for slot in slots:
        count = slot.shape[0] * slot.shape[1]
        array = np.frombuffer(buffer, dtype=slot.dtype, count=count, offset=base + slot.offset)
        parts[slot.matrix][slot.name] = array.reshape(slot.shape)
    return tuple(QuantizedMatrix.from_parts(spec, shapes[m], parts[m]) for m in MATRICES)


@dataclass(frozen=True)
class BlockEntry:
    """One expert's block in the pool file."""

    offset: int
    size: int
    crc32: int


@dataclass
class VerifyReport:
    """What `ExpertPool.verify` checked."""

    blocks: int
    bytes_checked: int
    bad: list[tuple[int, int]]   # (layer, expert) whose crc32 does not match

    @property
    def ok(self) -> bool:
        return not self.bad


class ExpertPool:
    """A read-only, memory-mapped pool of quantized experts, validated before use."""

    def __init__(self, path: Path, args: ModelArgs, spec: QuantSpec, blocks: dict[tuple[int, int], BlockEntry],
                 fd: int, mapping: mmap.mmap, file_bytes: int, copy: str = "full",
                 files: dict[str, dict] | None = None):
        self.path, self.args, self.spec, self.copy = path, args, spec, copy
        self.files = files or {}  # the manifest's checksums of the other files (digests.py)
        self.shapes = expert_shapes(args)
        self.slots, self.block_nbytes = block_layout(spec, self.shapes)
        self.blocks = blocks
        self.file_bytes = file_bytes
        self._fd, self._map = fd, mapping

    # -- opening and validation -----------------------------------------------------------------
    @classmethod
    def open(cls, model_dir: str | Path, copy: str = "full") -> "ExpertPool":
        """Open model_dir's experts (copy "miss": their low-bit copy); MixtralOffloadError on anything inconsistent."""
        model_dir = Path(model_dir)
        pool_name, manifest_name = COPIES[copy]
        pool_path = model_dir / pool_name
        check_no_loop(pool_path)
        if not pool_path.exists():
            raise MixtralOffloadError(f"{model_dir}: not a converted model directory (no {POOL_NAME})" if copy == "full"
                                      else f"{model_dir}: no low-bit copy of the experts ({pool_name}); convert "
                                           f"or synth with --miss-bits")
        args = ModelArgs.from_file(model_dir / CONFIG_NAME)
        config_quant = read_json_object(model_dir / CONFIG_NAME).get("quantization")
        if copy == "miss":
            config_quant = config_quant.get("miss") if isinstance(config_quant, dict) else None
        manifest_path = model_dir / manifest_name
        manifest_raw = read_regular(manifest_path, MANIFEST_LIMIT, "manifest")
        fd = open_regular(pool_path, pool_name)
        try:
            file_bytes = os.fstat(fd).st_size
            _check_header(pool_path, os.pread(fd, _HEADER.size, 0), file_bytes, manifest_raw)
            spec, blocks, files = _parse_manifest(manifest_path, manifest_raw, args, config_quant, file_bytes)
            check_digests(model_dir, files, HASHED_AT_LOAD)
            mapping = mmap.mmap(fd, file_bytes, access=mmap.ACCESS_READ)
        except BaseException:
            os.close(fd)
            raise
        return cls(model_dir, args, spec, blocks, fd, mapping, file_bytes, copy, files)

    # -- access (cache.source.BlockSource) -----------------------------------------------------
    @property
    def name(self) -> str:
        return str(self.path / COPIES[self.copy][0])

    def fileno(self) -> int:
        """The pool file's descriptor."""
        return self._fd

    def _entry(self, key: Key) -> BlockEntry:
        try:
            return self.blocks[key]
        except KeyError:
            raise IndexError(f"no expert {key} in {self.path}") from None

    def extents(self, key: Key) -> list[Extent]:
        """One page-aligned contiguous read per expert: its whole block (validated at open)."""
        return [Extent(self._entry(key).offset, self.block_nbytes, 0)]

    def mapped(self, key: Key) -> tuple[QuantizedMatrix, QuantizedMatrix, QuantizedMatrix]:
        """(w1, w3, w2) as zero-copy read-only views on the mapping (refused once the file was cut short)."""
        require_size(self._fd, self.file_bytes, self.name)
        return block_views(self._map, self._entry(key).offset, self.slots, self.spec, self.shapes)

    def views(self, buffer: np.ndarray, key: Key) -> tuple[QuantizedMatrix, QuantizedMatrix, QuantizedMatrix]:
        """(w1, w3, w2) as views on a buffer holding one block (every block has the same layout)."""
        if buffer.nbytes < self.block_nbytes:
            raise ValueError(f"buffer holds {buffer.nbytes} bytes, a block needs {self.block_nbytes}")
        return block_views(buffer, 0, self.slots, self.spec, self.shapes)

    def tensor_parts(self, buffer: "torch.Tensor") -> tuple[dict, dict, dict]:
        """(w1, w3, w2) parts as typed views on a torch uint8 buffer filled with one block (any device)."""
        import torch

        if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() < self.block_nbytes:
            raise ValueError(f"buffer must be a 1-D uint8 tensor of >= {self.block_nbytes} bytes")
        parts: dict[str, dict] = {m: {} for m in MATRICES}
        for slot in self.slots:
            raw = buffer[slot.offset:slot.offset + slot.nbytes]
            parts[slot.matrix][slot.name] = raw.view(getattr(torch, slot.dtype.name)).view(slot.shape)  # uint8, int8, float16
        return parts["w1"], parts["w3"], parts["w2"]

    def populate_mapped(self) -> bool:
        """Map the whole file mapping's pages in now, reading what the page cache lacks."""
        return populate_mapping(self._map)

    def release(self, key: Key, drop_cache: bool = False) -> None:
        """Drop this block's mapped pages from the process (RSS); with drop_cache, from the page cache too."""
        entry = self._entry(key)
        length = align(entry.size, PAGE)
        if hasattr(self._map, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED, entry.offset, min(length, self.file_bytes - entry.offset))
        if drop_cache and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, entry.offset, length, os.POSIX_FADV_DONTNEED)

    def verify(self, progress=None) -> VerifyReport:
        """Check every block's crc32 by reading the file (not the mapping); progress(bytes) is called per chunk."""
        chunk = np.empty(min(self.block_nbytes, 16 << 20), np.uint8)
        bad, checked = [], 0
        for key, entry in sorted(self.blocks.items()):
            crc, done = 0, 0
            while done < entry.size:
                want = min(chunk.nbytes, entry.size - done)
                got = os.preadv(self._fd, [memoryview(chunk)[:want]], entry.offset + done)
                if got <= 0:
                    break
                crc = zlib.crc32(memoryview(chunk)[:got], crc)
                done += got
                if progress is not None:
                    progress(got)
            checked += done
            if done != entry.size or crc != entry.crc32:
                bad.append(key)
        return VerifyReport(len(self.blocks), checked, bad)

    def close(self) -> None:
        """Unmap and close; views still alive keep the mapping until they are gone."""
        if self._fd < 0:
            return
        try:
            self._map.close()
        except BufferError:  # numpy views still export the buffer; the mapping closes when they die
            pass
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> "ExpertPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _check_header(pool_path: Path, raw: bytes, file_bytes: int, manifest_raw: bytes) -> None:
    if len(raw) < _HEADER.size:
        raise MixtralOffloadError(f"{pool_path}: too short to be an expert pool ({file_bytes} bytes)")
    magic, version, alignment, pool_bytes, manifest_bytes, manifest_crc = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise MixtralOffloadError(f"{pool_path}: not an expert pool (bad magic)")
    if version != FORMAT_VERSION:
        raise MixtralOffloadError(
            f"{pool_path}: pool format version {version} is not supported (this build reads version {FORMAT_VERSION})")
    if alignment != PAGE:
        raise MixtralOffloadError(f"{pool_path}: block alignment {alignment} is not supported (expected {PAGE})")
    if file_bytes < pool_bytes:
        raise MixtralOffloadError(f"{pool_path}: truncated: {file_bytes} bytes, the header says {pool_bytes}")
    if file_bytes != pool_bytes:
        raise MixtralOffloadError(f"{pool_path}: {file_bytes} bytes, the header says {pool_bytes}")
    if manifest_bytes != len(manifest_raw) or manifest_crc != zlib.crc32(manifest_raw):
        raise MixtralOffloadError(f"{pool_path}: its manifest does not belong to this pool "
                                  f"(length or crc32 differs from the pool header): damaged or mixed files")


def _parse_manifest(path: Path, raw: bytes, args: ModelArgs, config_quant, file_bytes: int
                    ) -> tuple[QuantSpec, dict[tuple[int, int], BlockEntry], dict[str, dict]]:
    manifest = parse_json(raw, str(path))
    try:
        return _check_manifest(path, manifest, args, config_quant, file_bytes)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, RecursionError) as exc:
        raise MixtralOffloadError(f"{path}: malformed manifest ({type(exc).__name__}: {exc})") from None


def _int(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _check_manifest(path: Path, manifest: dict, args: ModelArgs, config_quant, file_bytes: int):
    def fail(message: str):
        raise MixtralOffloadError(f"{path}: {message}")

    if not isinstance(manifest, dict):
        fail("expected a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        fail(f"format version {version!r} is not supported (this build reads version {FORMAT_VERSION})")
    spec = QuantSpec.from_dict(manifest["quantization"])
    if not isinstance(config_quant, dict):
        fail(f"{CONFIG_NAME} has no 'quantization' section: not a converted model")
    if config_quant.get("bits") != spec.bits or config_quant.get("group_size") != spec.group_size:
        fail(f"quantization {spec.to_dict()} disagrees with {CONFIG_NAME} "
             f"(bits {config_quant.get('bits')!r}, group_size {config_quant.get('group_size')!r})")
    L, E = args.num_hidden_layers, args.num_local_experts
    shapes = expert_shapes(args)
    if _int(manifest["num_layers"]) != L or _int(manifest["num_experts"]) != E:
        fail(f"{manifest['num_layers']} layers x {manifest['num_experts']} experts, {CONFIG_NAME} says {L} x {E}")
    listed = {m: tuple(_int(v) for v in manifest["shapes"][m]) for m in MATRICES}
    if listed != shapes:
        fail(f"expert shapes {listed} disagree with {CONFIG_NAME} (hidden {args.hidden_size}, "
             f"intermediate {args.intermediate_size}: {shapes})")
    slots, block_nbytes = block_layout(spec, shapes)
    expected_parts = {m: {s.name: s.to_dict() for s in slots if s.matrix == m} for m in MATRICES}
    entries = manifest["blocks"]
    if not isinstance(entries, list) or len(entries) != L * E:
        fail(f"expected {L * E} blocks, found {len(entries) if isinstance(entries, list) else entries!r}")
    blocks: dict[tuple[int, int], BlockEntry] = {}
    for item in entries:
        key = (_int(item["layer"]), _int(item["expert"]))
        offset, size, crc = _int(item["offset"]), _int(item["size"]), _int(item["crc32"])
        where = f"block (layer {key[0]}, expert {key[1]})"
        if not (0 <= key[0] < L and 0 <= key[1] < E):
            fail(f"{where} is outside the model's {L} layers x {E} experts")
        if key in blocks:
            fail(f"{where} is listed twice")
        if size != block_nbytes:
            fail(f"{where} has size {size}, the format needs {block_nbytes} bytes")
        if offset < PAGE or offset % PAGE:
            fail(f"{where} offset {offset} is not a page-aligned offset after the header")
        if offset + size > file_bytes:
            fail(f"{where} ends at byte {offset + size}, past the end of the pool ({file_bytes} bytes)")
        if not 0 <= crc < 2**32:
            fail(f"{where} has an invalid crc32 {crc}")
        if item["parts"] != expected_parts:
            fail(f"{where}: part table disagrees with the {spec.bits}-bit g{spec.group_size} layout of "
                 f"shapes {shapes}")
        blocks[key] = BlockEntry(offset, size, crc)
    ordered = sorted(blocks.values(), key=lambda b: b.offset)
    for before, after in zip(ordered, ordered[1:]):
        if before.offset + before.size > after.offset:
            fail(f"blocks at offsets {before.offset} and {after.offset} overlap")
    return spec, blocks, parse_digests(manifest.get("files"), CHECKED_FILES, str(path))


def manifest_dict(args: ModelArgs, spec: QuantSpec, blocks: dict[tuple[int, int], BlockEntry],
                  files: dict[str, dict]) -> dict:
    """The manifest.json object of a pool holding these blocks."""
    shapes = expert_shapes(args)
    slots, _ = block_layout(spec, shapes)
    parts = {m: {s.name: s.to_dict() for s in slots if s.matrix == m} for m in MATRICES}
    return {
        "format": "mixtral-offload expert pool",
        "format_version": FORMAT_VERSION,
        "quantization": spec.to_dict(),
        "alignment": PAGE,
        "checksum": "crc32",
        "num_layers": args.num_hidden_layers,
        "num_experts": args.num_local_experts,
        "shapes": {m: list(shapes[m]) for m in MATRICES},
        "blocks": [{"layer": layer, "expert": expert, "offset": b.offset, "size": b.size, "crc32": b.crc32,
                    "parts": parts} for (layer, expert), b in sorted(blocks.items())],
        "files": files,  # {name in CHECKED_FILES: {"bytes", "sha256"}}
    }
