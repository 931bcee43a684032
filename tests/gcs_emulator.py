"""The Cloud Storage emulator of the tests: gcp-storage-emulator, in memory, serving one bucket.

    python tests/gcs_emulator.py PORT BUCKET

It rewrites its whole object index after every write, which makes a checkpoint of a few hundred
objects take minutes; in memory that index is never read back, so the rewrite is skipped. It
answers the uploads' `Expect: 100-continue` at once, and queues many connections.
"""
import http.server
import sys

from gcp_storage_emulator import server, storage


def answer_expect_100(handler_class):
    """Answer `Expect: 100-continue` (which tensorstore's uploads send) at once: the emulator speaks
    HTTP/1.0, where http.server never sends the interim 100, and every upload then waited a second."""
    parse = handler_class.parse_request

    def parse_request(self):
        ok = parse(self)
        if ok and self.headers.get("Expect", "").lower() == "100-continue":
            self.send_response_only(100)
            self.end_headers()
        return ok
    handler_class.parse_request = parse_request


def main(port, bucket):
    storage.Storage._write_config_to_file = lambda self: None
    # tensorstore opens dozens of connections at once and the emulator closes each after one request:
    # beyond http.server's 5 waiting connections the kernel drops the new ones, and each retried a second later.
    http.server.HTTPServer.request_queue_size = 256
    answer_expect_100(server.RequestHandler)
    server.create_server("127.0.0.1", int(port), in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
    main(*sys.argv[1:])
