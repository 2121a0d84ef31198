"""Where a bad input row is, for its error message: a file's line from a byte offset, and the first byte that
is not UTF-8. Only errors need these (util/reading.py), and they read the file again to find it.

    raise InputError(f"{path}:{line_number(filesystem, path, offset)}: malformed JSON ...")
    raise utf8_error(filesystem, path)          # `<path>:<line>: not valid UTF-8 (... at byte N)`
"""

import codecs

import pyarrow.fs as pafs

from util.errors import InputError


def line_number(filesystem: pafs.FileSystem, path: str, offset: int) -> int:
    """The 1-based line that starts at byte `offset`. Reads the file up to there."""
    newlines = 0
    with filesystem.open_input_stream(path) as stream:
        while offset > 0 and (piece := stream.read(min(offset, 8 * 1024**2))):
            newlines, offset = newlines + piece.count(b"\n"), offset - len(piece)
    return newlines + 1


def utf8_error(filesystem: pafs.FileSystem, path: str) -> InputError:
    """`<path>:<line>: not valid UTF-8 (...)` for the file's first bad byte, read as a stream."""
    decoder, offset, newlines = codecs.getincrementaldecoder("utf-8")(), 0, 0
    with filesystem.open_input_stream(path) as stream:
        while True:
            piece = stream.read(1024**2)
            try:
                decoder.decode(piece, final=not piece)
            except UnicodeDecodeError as error:  # error.object: the decoder's held-back bytes, then the piece
                line = newlines + error.object[: error.start].count(b"\n") + 1
                at = offset - (len(error.object) - len(piece)) + error.start
                return InputError(f"{path}:{line}: not valid UTF-8 ({error.reason} at byte {at})")
            if not piece:
                return InputError(f"{path}: not valid UTF-8")
            offset, newlines = offset + len(piece), newlines + piece.count(b"\n")
