"""Files that are never half written, on a local disk or on gs://, and the small JSON files of a run.

A local file is written to a temporary file beside it, flushed to disk and renamed into place, so
a crash leaves the old file or the new one, never a mix; a Cloud Storage object appears only once
its upload completes, so it is written in place. Every writer of the project goes through here.
"""

import json
import os
import tempfile
import uuid

import fsspec
from etils import epath


def write_atomically(path, write):
    """Call write(f) with a binary file object whose bytes become `path` once it returns; if it
    raises, `path` is left as it was. Raises OSError when the place cannot be written."""
    path = os.fspath(path)
    if "://" in path:
        with epath.Path(path).open("wb") as f:
            write(f)
        return
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(path, payload):
    write_atomically(path, lambda f: f.write(payload))


def append_bytes(path, payload):
    """Add `payload` at the end of `path` (created if missing). On gs://, where objects are
    immutable, the bytes go up as an object of their own that Cloud Storage composes onto the end
    (what is already there is not uploaded again); a failure leaves the old object whole."""
    path = os.fspath(path)
    if "://" not in path:
        with open(path, "ab") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        return
    fs = fsspec.filesystem("gs")
    if not fs.exists(path):
        write_bytes(path, payload)
        return
    part = f"{path}.part-{uuid.uuid4().hex}"
    fs.pipe_file(part, payload)
    try:
        fs.merge(path, [path, part])
    finally:
        fs.rm_file(part)


def write_json(path, value, indent=1):
    write_bytes(path, (json.dumps(value, indent=indent, sort_keys=True) + "\n").encode())


def read_json(path):
    return json.loads(epath.Path(path).read_text())
