"""An image's sources, read (util/features/images/): a row's image column value as its images' sources, each
read or fetched as its encoded bytes (a local or bucket file, an http(s):// or data: URL, the bytes
themselves) and checked as PIL opens it, on the formatter's CPUs; and the replica's decoding, vLLM's own."""

import base64
import binascii
import functools
import io
import os
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import pyarrow.fs as pafs

from util.errors import ROW_ERRORS, error_text, row_error
from util.replica.internals import image_media_io
from util.storage import resolve, s3_location

DEFAULT_MAX_IMAGE_BYTES = 20 * 1024**2  # OpenAI's limit for one image of a chat request
# vLLM refuses larger images in the replica (its VLLM_MAX_IMAGE_PIXELS, 178,956,970 by default, which is
# also where PIL stops opening a file as a decompression bomb); refused here first, from the header alone.
MAX_IMAGE_PIXELS = int(os.environ.get("VLLM_MAX_IMAGE_PIXELS", "178956970"))
HTTP_TIMEOUT_S = 30.0
FETCH_THREADS = 16  # a formatter task fetches a batch's images at once: the wait is the network's, not the CPU's
BAD_IMAGE, TOO_MANY_IMAGES = "bad image", "too many images"
ROW_ERRORS.update({BAD_IMAGE: "image {number} of the row ({source}): {reason}",
                   TOO_MANY_IMAGES: "too many images: {count}; at most {most} per row (--max-images-per-row)"})


class ImageError(ValueError):
    """Why an image cannot go to the model; util/errors.py's BAD_IMAGE message puts it in the row's error."""


def image_sources(value) -> list:
    """An image column's value as its images' sources in order: strings (paths, URLs) or bytes. None, an
    empty string or an empty list: no image."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    if isinstance(value, (list, tuple)):
        return [source for item in value for source in image_sources(item)]
    if isinstance(value, dict):  # Hugging Face datasets' Image feature: the bytes, else the path
        return image_sources(value.get("bytes") if value.get("bytes") is not None else value.get("path"))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return [bytes(value)]
    if isinstance(value, str):
        return [value.strip()]
    raise ImageError(f"a {type(value).__name__} is not an image: give a path, a URL or the image's bytes")


def describe(source) -> str:
    """An image's source as an error message names it: bytes by their size, a data: URL by its media type."""
    if isinstance(source, bytes):
        return f"{len(source)} bytes"
    if source.startswith("data:"):
        return source.split(",", 1)[0] + ",..."
    return source


def _too_large(most: int, size: int | None = None) -> ImageError:
    return ImageError(f"{'' if size is None else f'{size} bytes, '}over the limit of {most} bytes (--max-image-bytes)")


@functools.lru_cache(maxsize=64)
def _bucket_filesystem(root: str) -> pafs.FileSystem:
    """One filesystem per bucket and worker: resolving an s3:// path asks S3 for the bucket's region."""
    return resolve(root)[0]


def _read_file(source: str, most: int) -> bytes:
    parsed = urlparse(source)
    if parsed.scheme in ("s3", "gs", "gcs"):
        filesystem = _bucket_filesystem(f"{parsed.scheme}://{parsed.netloc}")
        bucket, key, _ = s3_location(source)  # the one parser of a bucket URL (gs:// reads the same way)
        path = f"{bucket}/{key}"
    else:
        filesystem, path = resolve(source)
    try:
        info = filesystem.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise ImageError("not found")
        if info.type != pafs.FileType.File:
            raise ImageError("a folder, not a file")
        if info.size is not None and info.size > most:
            raise _too_large(most, info.size)
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except OSError as error:  # permissions, a vanished file, a bucket we may not read
        raise ImageError(f"cannot read ({error.strerror or error_text(error)})") from None


def _fetch_url(url: str, most: int) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "batch-llm"})
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > most:
                raise _too_large(most, int(length))
            data = response.read(most + 1)
    except urllib.error.HTTPError as error:
        raise ImageError(f"cannot fetch (HTTP {error.code} {error.reason})") from None
    except urllib.error.URLError as error:
        reason = error.reason  # a string, or the socket's error
        if isinstance(reason, BaseException):
            reason = getattr(reason, "strerror", None) or error_text(reason)
        raise ImageError(f"cannot fetch ({reason})") from None
    except (socket.timeout, TimeoutError):
        raise ImageError(f"cannot fetch (no answer in {HTTP_TIMEOUT_S:g} s)") from None
    except OSError as error:  # a connection reset while reading, say
        raise ImageError(f"cannot fetch ({error.strerror or error_text(error)})") from None
    if len(data) > most:
        raise _too_large(most)
    return data


def _decode_data_url(url: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ImageError("a data: URL must be data:<media type>;base64,<data>")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("a data: URL whose data is not valid base64") from None


def read_image_bytes(source, most: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
    """The encoded image of one source (see image_sources), at most `most` bytes; ImageError why not."""
    if isinstance(source, bytes):
        data = source
    elif source.startswith("data:"):
        data = _decode_data_url(source)
    elif urlparse(source).scheme in ("http", "https"):
        data = _fetch_url(source, most)
    else:
        data = _read_file(source, most)
    if len(data) > most:
        raise _too_large(most, len(data))
    return data


def open_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS):
    """The decoded image (PIL), checked: an image format PIL knows, at most `max_pixels` (read from the
    header before decoding), and readable whole (a truncated file fails here, not in the replica)."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:  # PIL's own limit, the same number as vLLM's default
        raise ImageError(f"over the limit of {max_pixels} pixels (VLLM_MAX_IMAGE_PIXELS)") from None
    except (Image.UnidentifiedImageError, OSError, ValueError):
        raise ImageError("not an image") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(f"{width}x{height} pixels, over the limit of {max_pixels} (VLLM_MAX_IMAGE_PIXELS)")
    try:
        image.load()
    except Exception as error:  # truncated or corrupt data: PIL raises OSError, ValueError, SyntaxError...
        raise ImageError(f"not a readable image ({error_text(error)})") from None
    return image


def fetch_images(sources: list, most: int = DEFAULT_MAX_IMAGE_BYTES) -> list:
    """read_image_bytes of every source, fetched concurrently: each the bytes or the ImageError."""
    def attempt(source):
        try:
            return read_image_bytes(source, most)
        except ImageError as error:
            return error

    if len(sources) <= 1:
        return [attempt(source) for source in sources]
    with ThreadPoolExecutor(max_workers=min(FETCH_THREADS, len(sources))) as pool:
        return list(pool.map(attempt, sources))


def engine_images(blobs: list[bytes]) -> list:
    """The replica's side: encoded images decoded by vLLM's ImageMediaIO (RGB, a transparent background
    made white, EXIF orientation applied), as vLLM's server decodes an image_url. Each keeps its bytes
    (MediaWithBytes), which vLLM hashes for its caches instead of the pixels."""
    loader = image_media_io()()
    return [loader.load_bytes(data) for data in blobs]


def bad_image(number: int, where: str, reason) -> str:
    """The error of a row whose image `number` (1-based, in prompt order), from `where`, fails for `reason`."""
    return row_error(BAD_IMAGE, number=number, source=where, reason=reason)
