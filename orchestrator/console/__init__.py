"""The web console (`codsplat console`): upload a capture, watch its job, look at the splat."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from ..backends import Backends
from ..settings import Settings
from .app import create_app
from .auth import Guard
from .service import ConsoleService
from .uploads import FolderUploads, S3Uploads


def build_console(settings: Settings, guard: Guard, embedded: Path | None = None):
    """The ASGI app over the same backends as the daemon: the local folder + SQLite, or S3 + DynamoDB."""
    backends = Backends(settings, embedded)
    if backends.embedded is not None:
        service = ConsoleService(backends.store, backends.blobs, FolderUploads(backends.embedded, guard.sign_path),
                                 backends.policy, settings)
        return create_app(service, guard, title=f"codsplat · {embedded}", connect_src="")
    s3 = backends.blobs.client
    service = ConsoleService(backends.store, backends.blobs, S3Uploads(s3, settings.bucket), backends.policy, settings)
    # the browser PUTs upload parts to S3 itself, and the viewer fetches presigned splat links
    endpoint = urlsplit(s3.meta.endpoint_url)
    return create_app(service, guard, title=f"codsplat · s3://{settings.bucket}",
                      connect_src=f"{endpoint.scheme}://{endpoint.netloc} https://*.amazonaws.com")
