"""LineSplitter: JSON-lines framing of a TCP byte stream (PROTOCOL.md section 1), no sockets."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterchat.errors import ErrorCode, FrameTooLarge
from clusterchat.protocol.frames import DEFAULT_MAX_FRAME, LineSplitter

LIMIT = 16


def feed_all(splitter: LineSplitter, chunks: list[bytes]) -> list[bytes]:
    frames: list[bytes] = []
    for chunk in chunks:
        frames.extend(splitter.feed(chunk))
    return frames


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at the given offsets (sorted, deduplicated, clipped to the data)."""
    points = sorted({c for c in cuts if 0 < c < len(data)})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# ---- basics --------------------------------------------------------------------


def test_default_limit_is_the_documented_65536() -> None:
    assert DEFAULT_MAX_FRAME == 65536
    splitter = LineSplitter()
    assert splitter.feed(b"x" * 65536 + b"\n") == [b"x" * 65536]
    with pytest.raises(FrameTooLarge):
        LineSplitter().feed(b"x" * 65537 + b"\n")


def test_one_frame_in_one_chunk() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b'{"op":"ping"}\n') == [b'{"op":"ping"}']
    assert splitter.pending == 0


def test_many_frames_in_one_chunk() -> None:
    frames = [b'{"op":"ping","rid":%d}' % i for i in range(100)]
    splitter = LineSplitter()
    assert splitter.feed(b"\n".join(frames) + b"\n") == frames
    assert splitter.pending == 0


def test_incomplete_frame_is_held_until_its_newline() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b'{"op":') == []
    assert splitter.pending == len(b'{"op":')
    assert splitter.feed(b'"ping"}') == []
    assert splitter.feed(b"\n") == [b'{"op":"ping"}']
    assert splitter.pending == 0


def test_frame_split_byte_by_byte() -> None:
    data = b'{"op":"send","to":2,"text":"h\xc3\xa9"}\n{"op":"ping"}\n'
    splitter = LineSplitter()
    out = feed_all(splitter, [data[i:i + 1] for i in range(len(data))])
    assert out == [b'{"op":"send","to":2,"text":"h\xc3\xa9"}', b'{"op":"ping"}']


def test_chunk_ending_mid_frame_after_whole_frames() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"a\nb\nc") == [b"a", b"b"]
    assert splitter.feed(b"d\ne") == [b"cd"]
    assert splitter.pending == 1
    assert splitter.feed(b"\n") == [b"e"]


def test_crlf_line_endings_are_stripped() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b'{"a":1}\r\n{"b":2}\r\n') == [b'{"a":1}', b'{"b":2}']


def test_crlf_split_between_cr_and_lf() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b'{"a":1}\r') == []
    assert splitter.feed(b"\n") == [b'{"a":1}']


def test_only_one_trailing_cr_is_stripped_and_inner_cr_kept() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"a\rb\r\n") == [b"a\rb"]


@pytest.mark.parametrize("blank", [b"\n", b"\r\n", b"   \n", b"\t\n", b" \t \r\n", b"\x0b\x0c\n"])
def test_blank_and_whitespace_lines_are_ignored(blank: bytes) -> None:
    splitter = LineSplitter()
    assert splitter.feed(blank + b"a\n" + blank + blank + b"b\n" + blank) == [b"a", b"b"]
    assert splitter.pending == 0


def test_frame_with_surrounding_spaces_is_kept_verbatim() -> None:
    assert LineSplitter().feed(b'  {"op":"ping"}  \n') == [b'  {"op":"ping"}  ']


# ---- the size limit -------------------------------------------------------------


def test_exactly_max_frame_bytes_is_accepted() -> None:
    splitter = LineSplitter(LIMIT)
    assert splitter.feed(b"x" * LIMIT + b"\n") == [b"x" * LIMIT]


def test_exactly_max_frame_bytes_with_crlf_in_one_chunk_is_accepted() -> None:
    splitter = LineSplitter(LIMIT)
    assert splitter.feed(b"x" * LIMIT + b"\r\n") == [b"x" * LIMIT]


def test_exactly_max_frame_bytes_arriving_in_pieces_is_accepted() -> None:
    splitter = LineSplitter(LIMIT)
    assert splitter.feed(b"x" * (LIMIT - 1)) == []
    assert splitter.feed(b"x") == []
    assert splitter.pending == LIMIT
    assert splitter.feed(b"\n") == [b"x" * LIMIT]


def test_exactly_max_frame_bytes_with_crlf_split_before_lf_is_accepted() -> None:
    splitter = LineSplitter(LIMIT)
    assert splitter.feed(b"x" * LIMIT + b"\r") == []
    assert splitter.feed(b"\n") == [b"x" * LIMIT]


def test_max_frame_plus_one_with_newline_is_rejected() -> None:
    splitter = LineSplitter(LIMIT)
    with pytest.raises(FrameTooLarge) as info:
        splitter.feed(b"x" * (LIMIT + 1) + b"\n")
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    assert str(LIMIT) in info.value.message


def test_max_frame_plus_one_with_crlf_is_rejected() -> None:
    with pytest.raises(FrameTooLarge):
        LineSplitter(LIMIT).feed(b"x" * (LIMIT + 1) + b"\r\n")


def test_oversized_frame_after_good_frames_in_same_chunk_is_rejected() -> None:
    with pytest.raises(FrameTooLarge):
        LineSplitter(LIMIT).feed(b"ok\n" + b"x" * (LIMIT + 1) + b"\nok\n")


def test_partial_line_over_the_limit_is_rejected_without_its_newline() -> None:
    splitter = LineSplitter(LIMIT)
    with pytest.raises(FrameTooLarge):
        splitter.feed(b"x" * (LIMIT + 1))


def test_partial_line_growing_past_the_limit_is_rejected_at_once() -> None:
    """The splitter never holds more than max_frame bytes: no unbounded buffering."""
    splitter = LineSplitter(LIMIT)
    for _ in range(LIMIT):
        assert splitter.feed(b"x") == []
        assert splitter.pending <= LIMIT
    with pytest.raises(FrameTooLarge):
        splitter.feed(b"x")


def test_huge_chunk_without_newline_is_rejected_not_buffered() -> None:
    splitter = LineSplitter(1024)
    with pytest.raises(FrameTooLarge):
        splitter.feed(b"x" * 10_000_000)
    assert splitter.pending == 0


def test_partial_line_over_the_limit_after_whole_frames_is_rejected() -> None:
    splitter = LineSplitter(LIMIT)
    with pytest.raises(FrameTooLarge):
        splitter.feed(b"a\nb\n" + b"x" * (LIMIT + 1))


# ---- properties -------------------------------------------------------------------

frame_bytes = st.binary(min_size=1, max_size=LIMIT).filter(
    lambda b: b"\n" not in b and not b.endswith(b"\r") and not b.isspace()
)


@settings(max_examples=300)
@given(frames=st.lists(frame_bytes, max_size=20), cuts=st.lists(st.integers(min_value=0, max_value=20 * (LIMIT + 1))))
def test_any_chunking_yields_exactly_the_frames(frames: list[bytes], cuts: list[int]) -> None:
    data = b"".join(f + b"\n" for f in frames)
    splitter = LineSplitter(LIMIT)
    assert feed_all(splitter, chunked(data, cuts)) == frames
    assert splitter.pending == 0


@settings(max_examples=300)
@given(
    items=st.lists(
        st.tuples(
            frame_bytes.filter(lambda b: len(b) < LIMIT),
            st.sampled_from([b"\n", b"\r\n"]),
            st.lists(st.sampled_from([b"\n", b"\r\n", b" \n", b"\t\r\n"]), max_size=2),
        ),
        max_size=20,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=20 * (LIMIT + 8))),
)
def test_any_chunking_with_crlf_and_blank_lines_yields_exactly_the_frames(
    items: list[tuple[bytes, bytes, list[bytes]]], cuts: list[int]
) -> None:
    data = b"".join(f + end + b"".join(blanks) for f, end, blanks in items)
    splitter = LineSplitter(LIMIT)
    assert feed_all(splitter, chunked(data, cuts)) == [f for f, _, _ in items]
    assert splitter.pending == 0


@settings(max_examples=200)
@given(
    good=st.lists(frame_bytes, max_size=5),
    extra=st.integers(min_value=1, max_value=50),
    newline=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=200)),
)
def test_any_chunking_of_an_oversized_frame_raises(good: list[bytes], extra: int, newline: bool,
                                                   cuts: list[int]) -> None:
    data = b"".join(f + b"\n" for f in good) + b"y" * (LIMIT + extra) + (b"\n" if newline else b"")
    splitter = LineSplitter(LIMIT)
    out: list[bytes] = []
    with pytest.raises(FrameTooLarge):
        for chunk in chunked(data, cuts):
            out.extend(splitter.feed(chunk))
            assert splitter.pending <= LIMIT
    assert out == good[: len(out)]
