"""MLLP framing: the decoder against a byte-at-a-time reference, and its edges."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hl7.framing import OVERSIZE_HEAD_BYTES, MLLPDecoder, Oversize, frame

SB, EB, CR = 0x0B, 0x1C, 0x0D


def reference_decode(stream: bytes, limit: int) -> tuple[list[bytes | Oversize], int]:
    """The documented behaviour, one byte at a time: slow and obviously right."""
    out: list[bytes | Oversize] = []
    discarded = 0
    in_frame = swallow_cr = False
    frame_bytes = bytearray()
    for byte in stream:
        if swallow_cr:
            swallow_cr = False
            if byte == CR:
                continue
        if not in_frame:
            if byte == SB:
                in_frame, frame_bytes = True, bytearray()
            else:
                discarded += 1
        elif byte == SB:  # a new frame abandons the unfinished one
            if len(frame_bytes) > limit:
                out.append(Oversize(len(frame_bytes), bytes(frame_bytes[: min(OVERSIZE_HEAD_BYTES, limit)])))
            else:
                discarded += len(frame_bytes)
            frame_bytes = bytearray()
        elif byte == EB:
            if len(frame_bytes) > limit:
                out.append(Oversize(len(frame_bytes), bytes(frame_bytes[: min(OVERSIZE_HEAD_BYTES, limit)])))
            else:
                out.append(bytes(frame_bytes))
            in_frame, swallow_cr = False, True
        else:
            frame_bytes.append(byte)
    return out, discarded


def decode_in_chunks(stream: bytes, cuts: list[int], limit: int):
    decoder = MLLPDecoder(limit)
    out: list[bytes | Oversize] = []
    previous = 0
    for cut in sorted(set(cuts)) + [len(stream)]:
        out += decoder.feed(stream[previous:cut])
        previous = cut
        assert decoder.buffered_bytes <= limit
    return out, decoder


PAYLOAD = st.binary(max_size=40).map(lambda b: b.replace(b"\x0b", b"").replace(b"\x1c", b""))
NOISE = st.binary(max_size=10).map(lambda b: b.replace(b"\x0b", b""))
STREAM_PIECES = st.lists(
    st.sampled_from([b"\x0b", b"\x1c", b"\r", b"\x1c\r", b"a", b"MSH|", b"\x00\xff", b"xyz" * 5]),
    max_size=60,
).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(NOISE, PAYLOAD), max_size=8),
    st.lists(st.integers(0, 500), max_size=20),
)
def test_any_split_of_a_stream_yields_the_same_messages(frames, cuts):
    stream = b"".join(noise + frame(payload) for noise, payload in frames)
    out, decoder = decode_in_chunks(stream, cuts, limit=1000)
    assert out == [payload for _, payload in frames]
    assert decoder.discarded_bytes == sum(len(noise) for noise, _ in frames)
    assert not decoder.has_partial


@settings(max_examples=300, deadline=None)
@given(STREAM_PIECES, st.lists(st.integers(0, 400), max_size=20), st.integers(1, 30))
def test_decoder_matches_the_byte_at_a_time_reference(stream, cuts, limit):
    out, decoder = decode_in_chunks(stream, cuts, limit)
    expected, discarded = reference_decode(stream, limit)
    assert out == expected
    assert decoder.discarded_bytes == discarded


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=20))
def test_random_bytes_never_raise_and_are_accounted_for(stream, cuts):
    out, decoder = decode_in_chunks(stream, cuts, limit=64)
    expected, discarded = reference_decode(stream, 64)
    assert out == expected and decoder.discarded_bytes == discarded
    if b"\x0b" not in stream:
        assert out == [] and decoder.discarded_bytes == len(stream)


def test_split_reads_and_several_frames_per_read():
    decoder = MLLPDecoder(100)
    assert decoder.feed(b"\x0bMSH|one") == []
    assert decoder.has_partial
    assert decoder.feed(b"\r\x1c") == [b"MSH|one\r"]
    assert decoder.feed(b"\r\x0bA\x1c\r\x0bB\x1c\r\x0bC") == [b"A", b"B"]
    assert decoder.feed(b"\x1c\r") == [b"C"]
    assert decoder.discarded_bytes == 0 and not decoder.has_partial


def test_end_block_without_carriage_return_ends_the_frame():
    decoder = MLLPDecoder(100)
    assert decoder.feed(b"\x0bA\x1c\x0bB\x1cZ") == [b"A", b"B"]
    assert decoder.discarded_bytes == 1  # "Z" is outside any frame


def test_new_start_block_abandons_the_partial_frame():
    decoder = MLLPDecoder(100)
    assert decoder.feed(b"junk\x0bpartial") == []
    assert decoder.feed(b"\x0bwhole\x1c\r") == [b"whole"]
    assert decoder.discarded_bytes == len(b"junk") + len(b"partial")


def test_oversize_frames_are_reported_in_order_with_their_head():
    decoder = MLLPDecoder(10)
    out = decoder.feed(b"\x0bshort\x1c\r\x0bMSH|^~\\&|A|B|C\x1c\r\x0bnext\x1c\r")
    assert out == [b"short", Oversize(14, b"MSH|^~\\&|A"), b"next"]
    assert decoder.discarded_bytes == 0


def test_an_oversize_frame_abandoned_by_a_new_frame_is_still_reported():
    decoder = MLLPDecoder(4)
    assert decoder.feed(b"\x0btoo long\x0bok\x1c") == [Oversize(8, b"too "), b"ok"]


def test_memory_stays_bounded_whatever_the_sender_streams():
    limit = 1000
    decoder = MLLPDecoder(limit)
    assert decoder.feed(b"\x0bMSH|") == []
    for _ in range(2000):  # 8 MB without an end block
        assert decoder.feed(b"x" * 4096) == []
        assert decoder.buffered_bytes <= limit
    (event,) = decoder.feed(b"\x1c\r")
    assert event == Oversize(4 + 2000 * 4096, b"MSH|" + b"x" * (limit - 4))


def test_oversize_head_is_capped():
    decoder = MLLPDecoder(10 * OVERSIZE_HEAD_BYTES)
    (event,) = decoder.feed(b"\x0b" + b"y" * (10 * OVERSIZE_HEAD_BYTES + 1) + b"\x1c")
    assert len(event.head) == OVERSIZE_HEAD_BYTES
    assert decoder.buffered_bytes == 0


def test_frame_wraps_and_refuses_framing_bytes_in_the_payload():
    assert frame(b"MSH|x\r") == b"\x0bMSH|x\r\x1c\r"
    for bad in (b"a\x0bb", b"a\x1cb"):
        with pytest.raises(ValueError):
            frame(bad)
    with pytest.raises(ValueError):
        MLLPDecoder(0)
