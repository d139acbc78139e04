"""A Google Cloud Storage emulator for the tests of `gs://` workdirs: no network, no account.

  python tests/gcs_emulator.py PORT BUCKET

serves an in-memory GCS JSON API holding BUCKET on 127.0.0.1:PORT until it is terminated
(`gcp-storage-emulator`, from the `dev` extra). `environment(url)` points every client a
workdir goes through at it. The `gcs_bucket` fixture (tests/conftest.py) runs it for a session.

Two things GCS does that the emulator does not, and Fulcrum's clients rely on, are added:
generation preconditions with the `x-goog-generation` header (tensorstore's OCDBT manifests,
which orbax writes) and objects.moveTo (gcsfs's rename).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from http import HTTPStatus


def environment(url: str) -> dict[str, str]:
  """The variables that send each GCS client to the emulator at `url` instead of Google."""
  return {
    # gcsfs (etils.epath's gs:// backend without TensorFlow) and google-cloud-storage
    # (tensorboardX's gs:// event writer).
    "STORAGE_EMULATOR_HOST": url,
    # tensorstore's gcs kvstore: the arrays orbax writes.
    "TENSORSTORE_GCS_HTTP_URL": url,
    # tensorstore: a fixed bearer token, so it never looks for credentials or a metadata server.
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
    # gcsfs: no bucket-layout query to the real storage control API (gRPC, needs credentials).
    # Read when gcsfs is imported: set it before.
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
  }


def _move(request, response, storage, *args, **kwargs):
  """objects.moveTo, which gcsfs renames with and the emulator lacks (without it every rename
  retries a 501 for ~35 s before copying): a copy within the bucket, then a delete."""
  from gcp_storage_emulator.handlers import objects

  request.params["dest_bucket_name"] = request.params["bucket_name"]
  objects.copy(request, response, storage)
  if response.status == HTTPStatus.OK:
    storage.delete_file(request.params["bucket_name"], request.params["object_id"])


def _generation(storage, bucket: str, name: str | None) -> str | None:
  """An object's generation; "0" when it does not exist (GCS's "must not exist" precondition)."""
  from gcp_storage_emulator.exceptions import NotFound

  if name is None:
    return None
  try:
    return str(storage.get_file_obj(bucket, name)["generation"])
  except NotFound:
    return "0"


def _preconditions(handler):
  """`handler` with GCS's ifGenerationMatch / ifGenerationNotMatch and, on reads, the object's
  generation in `x-goog-generation`. tensorstore revalidates a cached OCDBT manifest with
  ifGenerationNotMatch and takes a 200 without that header for a malformed generation."""

  def checked(request, response, storage, *args, **kwargs):
    query = request.query
    name = request.params.get("object_id") or query.get("name", [None])[0]
    if name is None and query.get("uploadType") == ["multipart"]:  # Named in its metadata part.
      name = request.data["meta"].get("name")
    current = _generation(storage, request.params["bucket_name"], name)
    match = query.get("ifGenerationMatch", [None])[0]
    not_match = query.get("ifGenerationNotMatch", [None])[0]
    reading = request.method == "GET"
    if current is not None and match is not None and match != current:
      response.status = HTTPStatus.PRECONDITION_FAILED
    elif current not in (None, "0") and not_match == current:
      response.status = HTTPStatus.NOT_MODIFIED if reading else HTTPStatus.PRECONDITION_FAILED
    else:
      handler(request, response, storage, *args, **kwargs)
      if reading and response.status == HTTPStatus.OK and current not in (None, "0"):
        response["x-goog-generation"] = current
        response["x-goog-metageneration"] = "1"

  return checked


def _exit_with_parent(parent: int) -> None:
  """Ends this process once the one that started it is gone (a killed pytest leaves no server)."""
  while os.getppid() == parent:
    time.sleep(1)
  os._exit(0)


def serve(port: int, bucket: str) -> None:
  from gcp_storage_emulator import server
  from gcp_storage_emulator.handlers import objects

  checked = {f: _preconditions(f) for f in (objects.get, objects.download, objects.insert)}
  routes = [
    (r, {m: checked.get(f, f) for m, f in methods.items()}) for r, methods in server.HANDLERS
  ]
  move = (
    r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)"
    r"/moveTo/o/(?P<dest_object_id>.*[^/]+)$"
  )
  server.HANDLERS = ((move, {"POST": _move}), *routes)
  threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
  logging.disable(logging.CRITICAL)  # Every exists() of a missing object logs a 404.
  server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
  serve(int(sys.argv[1]), sys.argv[2])
