"""Damaged GGUF files: truncated, bytes flipped, header values replaced by huge counts, offsets and wrong
types. Opening and using one is a one-line MixtralOffloadError or a success, never another exception
and never a hang."""
import signal

import gguf
import pytest
from checkpoints import write_checkpoint
from gguf_files import write_gguf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixtral_offload.errors import MixtralOffloadError
from mixtral_offload.offload.store.gguf import GGUFModel

SECONDS_PER_FILE = 10   # opening the base file takes ~0.1 s; a loop over a flipped count would take hours
SMALL = dict(vocab_size=260, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1)


class Base:
    """The undamaged file's bytes and the (offset, size) of every value in its header."""

    def __init__(self, root):
        write_checkpoint(root / "hf", **SMALL)
        path = write_gguf(root / "hf", root / "base.gguf", "q8_0")
        self.data = path.read_bytes()
        reader = gguf.GGUFReader(path)
        self.header_bytes = reader.data_offset
        start = reader.data.ctypes.data
        self.values = sorted({(part.ctypes.data - start, part.nbytes)   # lengths, counts, type tags, dims, offsets
                              for field in [*reader.fields.values(), *(t.field for t in reader.tensors)]
                              for part in field.parts[:6] if part.dtype.itemsize >= 4})
        scores = reader.fields["tokenizer.ggml.scores"].parts[4]       # the scores array's length
        self.scores_length = scores.ctypes.data - start
        self.path = root / "damaged.gguf"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return Base(tmp_path_factory.mktemp("gguf-fuzz"))


class Hang(BaseException):
    """Raised by the alarm: a BaseException, so that no handler for errors can swallow it."""


def _timeout(signum, frame):
    raise Hang(f"a damaged file took more than {SECONDS_PER_FILE} s")


def use(path):
    """Open the file and touch everything a load would: tokenizer, dense tensors, expert bytes."""
    previous = signal.signal(signal.SIGALRM, _timeout)
    # repeating: an exception raised while a gc callback runs is swallowed, the next one is not
    signal.setitimer(signal.ITIMER_REAL, SECONDS_PER_FILE, 0.5)
    try:
        model = GGUFModel.open(path)
        model.tokenizer()
        for name in ("embed", "layers.0.wq", "layers.0.gate"):
            model.dense_tensor(name)
        for layer, expert in ((0, 0), (0, 1)):
            model.expert_views(layer, expert)
    except MixtralOffloadError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def replace_value(data: bytearray, offset: int, size: int, value: int) -> None:
    data[offset:offset + size] = (value % (1 << 8 * size)).to_bytes(size, "little")


def test_base_file_opens(base):
    base.path.write_bytes(base.data)
    use(base.path)
    offsets = [offset for offset, _ in base.values]
    assert min(offsets) < 16 and max(offsets) > base.header_bytes // 2   # the fuzzer reaches the whole header


FUZZ = dict(derandomize=True, deadline=None, database=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@settings(max_examples=40, **FUZZ)
@given(fraction=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated(base, fraction):
    base.path.write_bytes(base.data[:int(len(base.data) * fraction)])
    use(base.path)


@settings(max_examples=40, **FUZZ)
@given(flips=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8))
def test_flipped_header_bytes(base, flips):
    data = bytearray(base.data)
    for where, byte in flips:
        data[int(where * base.header_bytes)] = byte
    base.path.write_bytes(bytes(data))
    use(base.path)


@settings(max_examples=150, **FUZZ)   # without the reader's guards, example 98 hangs
@given(data=st.data())
def test_replaced_header_values(base, data):
    """A count, length, type tag, dimension or offset replaced by a small, huge or boundary value."""
    damaged = bytearray(base.data)
    size = len(damaged)
    for _ in range(data.draw(st.integers(1, 3))):
        offset, nbytes = data.draw(st.sampled_from(base.values))
        value = data.draw(st.sampled_from([0, 1, 2, 3, 5, 7, 9, 12, 13, 31, 32, 255, 1 << 16, (1 << 31) - 1, 1 << 31,
                                           (1 << 32) - 1, 1 << 32, 1 << 63, (1 << 64) - 1, size - 1, size, size * 8]))
        replace_value(damaged, offset, nbytes, value)
    base.path.write_bytes(bytes(damaged))
    use(base.path)


@pytest.mark.parametrize("length,message", [(1 << 62, "a metadata array of 4611686018427387904 entries"),
                                            (1 << 19, "runs past the end of the file")])
def test_long_array_is_refused_not_looped(base, length, message):
    """A uint8 array running past the file: unguarded, gguf's reader loops over empty reads for ever."""
    damaged = bytearray(base.data)
    replace_value(damaged, base.scores_length - 4, 4, int(gguf.GGUFValueType.UINT8))   # the item type
    replace_value(damaged, base.scores_length, 8, length)
    base.path.write_bytes(bytes(damaged))
    with pytest.raises(MixtralOffloadError, match=message):
        GGUFModel.open(base.path)
