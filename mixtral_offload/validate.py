"""Checks for what a user or a file supplies: typed and ranged fields, bounded reads of regular files
only, paths confined to a directory, and UTF-8 decoding that names the first invalid byte.

Every check raises MixtralOffloadError with one line naming the source and the field.
"""
from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

from .errors import MixtralOffloadError

JSON_LIMIT = 16 << 20       # config.json, an index, a TOML file: far above any real one
MANIFEST_LIMIT = 64 << 20   # a pool manifest (Mixtral-8x7B's is ~0.4 MB)
PROFILE_LIMIT = 1 << 30     # a profile written by --profile
TEXT_LIMIT = 256 << 20      # a text to score (a FIFO or /dev/zero must not fill memory)
MAX_INT_DIGITS = 40         # a JSON integer longer than this is no size, offset or checksum
UINT64_MAX = 2**64 - 1


def show(value) -> str:
    """A short printable form of a value for an error message (huge integers are not printed whole)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(source: str, message: str):
    raise MixtralOffloadError(f"{source}: {message}" if source else message)


def int_field(value, name: str, low: int, high: int, source: str = "") -> int:
    """value as an int in [low, high]; a bool, a float or anything else is refused."""
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(source, f"{name} must be an integer, got {show(value)}")
    if not low <= value <= high:
        _fail(source, f"{name} must be between {low} and {high}, got {show(value)}")
    return value


def float_field(value, name: str, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, source: str = "") -> float:
    """value (an int or a float, not a bool) as a finite float in [low, high] ((low, high] with low_open)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(source, f"{name} must be a number, got {show(value)}")
    try:
        number = float(value)
    except OverflowError:
        _fail(source, f"{name} is out of range, got {show(value)}")
    if not math.isfinite(number):
        _fail(source, f"{name} must be a finite number, got {show(value)}")
    if low is not None and (number <= low if low_open else number < low):
        _fail(source, f"{name} must be {'>' if low_open else '>='} {low}, got {show(value)}")
    if high is not None and number > high:
        _fail(source, f"{name} must be <= {high}, got {show(value)}")
    return number


def bool_field(value, name: str, source: str = "") -> bool:
    """value if it is a real bool (JSON true/false), not a string or a number."""
    if not isinstance(value, bool):
        _fail(source, f"{name} must be true or false, got {show(value)}")
    return value


def str_field(value, name: str, source: str = "") -> str:
    """value if it is a string."""
    if not isinstance(value, str):
        _fail(source, f"{name} must be a string, got {show(value)}")
    return value


def seed_field(value, name: str = "seed", source: str = "") -> int | None:
    """A sampling seed: None or an integer in 0..2**64-1."""
    return None if value is None else int_field(value, name, 0, UINT64_MAX, source)


# -- files ----------------------------------------------------------------------------------------
def regular_file_size(path: str | Path, what: str = "file") -> int:
    """The size of path, which must be a regular file (not a FIFO, a device or a directory)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        _fail(str(path), f"{what} not found")
    except OSError as exc:
        _fail(str(path), f"cannot read ({_reason(exc)})")
    if not stat.S_ISREG(info.st_mode):
        _fail(str(path), f"not a regular file (a {_kind(info.st_mode)})")
    return info.st_size


def open_regular(path: str | Path, what: str = "file") -> int:
    """A read-only descriptor of a regular file; O_NONBLOCK, so a FIFO put in its place cannot hang the open."""
    regular_file_size(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        _fail(str(path), f"cannot open ({_reason(exc)})")
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):  # swapped between the stat and the open
        os.close(fd)
        _fail(str(path), f"not a regular file (a {_kind(mode)})")
    return fd


def require_size(fd: int, size: int, name: str) -> None:
    """Refuse to touch a mapping of fd once its file is shorter than the size validated at open (a read
    past the end of a mapped file is SIGBUS, not an exception): one fstat."""
    now = os.fstat(fd).st_size
    if now < size:
        _fail(name, f"cut short to {now} bytes while in use (was {size}): the model files changed under "
                    f"this process")


def read_regular(path: str | Path, limit: int, what: str = "file") -> bytes:
    """The whole of a regular file of at most limit bytes."""
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            _fail(str(path), f"{size} bytes, more than the {limit} a {what} may have")
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        _fail(str(path), f"cannot read ({_reason(exc)})")
    finally:
        os.close(fd)
    if total > limit:  # grew while being read
        _fail(str(path), f"more than the {limit} bytes a {what} may have")
    return b"".join(chunks)


def read_stream(handle, limit: int, source: str) -> bytes:
    """At most limit bytes of an open binary stream (stdin, a pipe); more is refused."""
    data = handle.read(limit + 1)
    if len(data) > limit:
        _fail(source, f"more than the {limit} bytes accepted")
    return data


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise MixtralOffloadError(f"an integer of {len(text)} digits")
    return int(text)


def _no_constant(name: str):
    raise MixtralOffloadError(f"{name} is not valid JSON")


def parse_json(data: bytes, source: str):
    """A JSON document; huge integers, NaN/Infinity, invalid UTF-8 and deep nesting are one-line errors."""
    text = decode_utf8(data, source)
    try:
        return json.loads(text, parse_int=_bounded_int, parse_constant=_no_constant)
    except MixtralOffloadError as exc:
        _fail(source, f"not valid JSON ({exc})")
    except (ValueError, RecursionError) as exc:
        _fail(source, f"not valid JSON ({type(exc).__name__}: {str(exc)[:100]})")


def read_json_object(path: str | Path, limit: int = JSON_LIMIT) -> dict:
    """A JSON object from a regular file of at most limit bytes."""
    data = parse_json(read_regular(path, limit, "JSON file"), str(path))
    if not isinstance(data, dict):
        _fail(str(path), "expected a JSON object")
    return data


def confined(base: str | Path, name, source: str) -> Path:
    """base/name, refused when the name leads out of base ('/etc/passwd', '../x') or loops.

    The name is confined as written; a symlink inside base may point elsewhere (the Hugging Face
    cache lays out a snapshot's files that way)."""
    if not isinstance(name, str) or not name or "\0" in name:
        _fail(source, f"file name {show(name)} is not a file name")
    root = Path(os.path.abspath(base))
    target = Path(os.path.abspath(root / name))
    if root not in target.parents:
        _fail(source, f"{name} names a file outside {root}")
    check_no_loop(target)
    return target


def check_no_loop(path: str | Path) -> None:
    """Refuse a path whose symlinks loop, with that message (not a misleading 'not found')."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == 40:  # ELOOP
            _fail(str(path), "a symlink that points back at itself (loop)")


# -- text -----------------------------------------------------------------------------------------
def decode_utf8(data: bytes, source: str) -> str:
    """data as UTF-8; the first invalid byte is named with its offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        _fail(source, f"not valid UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start}")


def check_utf8(text: str, source: str) -> str:
    """text, refused if it holds lone surrogates (undecodable bytes from argv or a terminal)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        offset = len(text[:exc.start].encode("utf-8", "surrogateescape"))
        char = ord(text[exc.start])
        byte = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"character U+{char:04X}"
        _fail(source, f"not valid UTF-8: {byte} at offset {offset}")
    return text


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"
