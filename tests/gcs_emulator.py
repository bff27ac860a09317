"""gcp-storage-emulator with GCS's objects.move (POST .../o/{object}/moveTo/o/{destination}), which
it lacks: gcsfs renames by that call first and, on the emulator's 501, retried with backoff for
~30 s a rename before it fell back to copy and delete (tests/test_buckets.py's encode, 3 files:
100 s). Here a move is the emulator's own copy, then delete. Run as the emulator's command line:
python tests/gcs_emulator.py start --host 127.0.0.1 --port N --in-memory -q"""

import sys
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.__main__ import main
from gcp_storage_emulator.handlers import objects


def move(request, response, storage, *args, **kwargs):
    request.params["dest_bucket_name"] = request.params["bucket_name"]
    objects.copy(request, response, storage)
    if response.status == HTTPStatus.OK:
        objects._delete(storage, request.params["bucket_name"], request.params["object_id"])


ROUTE = r"/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/(?P<dest_object_id>.*[^/]+)$"
server.HANDLERS = tuple((rf"^{prefix}{ROUTE}", {"POST": move}) for prefix in ("/storage/v1", "")) + server.HANDLERS

if __name__ == "__main__":
    sys.exit(main())
