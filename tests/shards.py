"""The tests' one writer of tar shards: members as (name, bytes), in the order given."""
import io
import tarfile

import numpy as np

import corpus


def npy(array, allow_pickle=False):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def write_shard(path, members):
    """A tar shard of (name, payload) members, written with the corpus tools' own member writer."""
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            corpus.add_member(tar, name, payload)
    return str(path)
