"""MLLP framing: ``0x0B`` message ``0x1C 0x0D``.

``MLLPDecoder`` turns the bytes of one connection, read in chunks of any
size, into messages. It never holds more than ``max_message_bytes`` of a
message, and it never keeps bytes that cannot belong to one:

* Bytes outside a frame (line noise, a peer that does not speak MLLP) are
  dropped and counted in ``discarded_bytes``.
* A ``0x0B`` inside an unfinished frame starts a new frame: the sender gave up
  on the previous one (typically it timed out and resent), so the partial
  frame is dropped and counted in ``discarded_bytes``.
* ``0x1C`` ends a frame even when no ``0x0D`` follows (some senders omit it);
  the byte after it is then treated as outside any frame.
* A frame longer than ``max_message_bytes`` is not buffered: its first bytes
  are kept (up to ``OVERSIZE_HEAD_BYTES``, so the MSH segment can be read to
  address a rejection), the rest is counted and dropped, and when the frame
  ends ``feed`` returns an ``Oversize`` in its place.

``feed`` returns, in stream order, the payload (``bytes``, framing removed) of
each complete frame and an ``Oversize`` for each frame that was too long, so
the caller can answer every frame in the order it arrived.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["END_BLOCK", "OVERSIZE_HEAD_BYTES", "START_BLOCK", "MLLPDecoder", "Oversize", "frame"]

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c"
_CARRIAGE_RETURN = 0x0D

#: How much of an oversize frame is kept for the caller: enough for MSH.
OVERSIZE_HEAD_BYTES = 4096


def frame(message: bytes) -> bytes:
    """Wrap one message for MLLP.

    Refuses a message containing a framing byte: the receiver would cut it
    there (escape such characters in the data with ``hl7.ack.escape``).
    """
    if START_BLOCK in message or END_BLOCK in message:
        raise ValueError("an MLLP payload cannot contain 0x0B or 0x1C")
    return START_BLOCK + message + b"\x1c\r"


@dataclass(frozen=True)
class Oversize:
    """A frame dropped for exceeding the limit.

    ``size`` is its length in bytes (framing excluded); ``head`` its first
    bytes, to salvage the header for a rejection.
    """

    size: int
    head: bytes


class MLLPDecoder:
    """Incremental MLLP decoder for one connection (see the module docstring)."""

    def __init__(self, max_message_bytes: int) -> None:
        if max_message_bytes < 1:
            raise ValueError("max_message_bytes must be positive")
        self.max_message_bytes = max_message_bytes
        #: Bytes dropped because they were outside a frame, or in a frame a
        #: new start block abandoned.
        self.discarded_bytes = 0
        self._buffer = bytearray()
        self._in_frame = False
        self._oversize_head: bytes | None = None  # set while skipping an oversize frame
        self._oversize_size = 0
        self._after_end_block = False  # a 0x0D starting the next chunk is framing

    @property
    def has_partial(self) -> bool:
        """A frame has started and not ended (it is lost if the peer hangs up)."""
        return self._in_frame

    @property
    def buffered_bytes(self) -> int:
        """Memory held for the current frame: at most ``max_message_bytes``."""
        return len(self._buffer) + len(self._oversize_head or b"")

    def feed(self, data: bytes) -> list[bytes | Oversize]:
        """Consume a chunk; return the frames it completed, in order."""
        completed: list[bytes | Oversize] = []
        position = 0
        length = len(data)
        if self._after_end_block and length:
            self._after_end_block = False
            if data[0] == _CARRIAGE_RETURN:
                position = 1
        while position < length:
            if not self._in_frame:
                start = data.find(START_BLOCK, position)
                if start < 0:
                    self.discarded_bytes += length - position
                    break
                self.discarded_bytes += start - position
                self._in_frame = True
                position = start + 1
                continue
            end = data.find(END_BLOCK, position)
            stop = length if end < 0 else end
            restart = data.find(START_BLOCK, position, stop)
            if restart >= 0:
                self._take(data, position, restart)
                self._abandon_frame(completed)
                position = restart + 1
                self._in_frame = True
                continue
            self._take(data, position, stop)
            if end < 0:
                break
            completed.append(self._finish_frame())
            position = end + 1
            if position == length:
                self._after_end_block = True
            elif data[position] == _CARRIAGE_RETURN:
                position += 1
        return completed

    def _take(self, data: bytes, start: int, stop: int) -> None:
        """Add data[start:stop] to the current frame, within the limit."""
        count = stop - start
        if self._oversize_head is not None:
            self._oversize_size += count
            return
        if len(self._buffer) + count <= self.max_message_bytes:
            self._buffer += data[start:stop]
            return
        keep = min(OVERSIZE_HEAD_BYTES, self.max_message_bytes)
        head = bytes(self._buffer[:keep])
        self._oversize_head = head + data[start : start + keep - len(head)]
        self._oversize_size = len(self._buffer) + count
        self._buffer.clear()

    def _finish_frame(self) -> bytes | Oversize:
        self._in_frame = False
        if self._oversize_head is not None:
            result: bytes | Oversize = Oversize(self._oversize_size, self._oversize_head)
            self._oversize_head = None
            self._oversize_size = 0
            return result
        message = bytes(self._buffer)
        self._buffer.clear()
        return message

    def _abandon_frame(self, completed: list[bytes | Oversize]) -> None:
        """A start block arrived inside a frame: drop the partial frame.

        An oversize frame is still reported, so its sender gets an answer.
        """
        if self._oversize_head is not None:
            completed.append(self._finish_frame())
        else:
            self.discarded_bytes += len(self._buffer)
            self._buffer.clear()
            self._in_frame = False
