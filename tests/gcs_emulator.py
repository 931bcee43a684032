"""The Cloud Storage emulator of the tests: gcp-storage-emulator, in memory, serving one bucket.

    python tests/gcs_emulator.py PORT BUCKET

It rewrites its whole object index after every write, which makes a checkpoint of a few hundred
objects take minutes; in memory that index is never read back, so the rewrite is skipped.
"""
import sys

from gcp_storage_emulator import server, storage


def main(port, bucket):
    storage.Storage._write_config_to_file = lambda self: None
    server.create_server("127.0.0.1", int(port), in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
    main(*sys.argv[1:])
