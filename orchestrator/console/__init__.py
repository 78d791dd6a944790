"""The web console (`codsplat console`): upload a capture, watch its job, look at the splat."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from ..assemble import aws_client, embedded_policy, store_for
from ..blobs import FolderBlobs, S3Blobs
from ..settings import Settings
from .app import create_app
from .auth import Guard
from .service import ConsoleService
from .uploads import FolderUploads, S3Uploads


def build_console(settings: Settings, guard: Guard, embedded: Path | None = None):
    """The ASGI app over the same backends as the daemon: the local folder + SQLite, or S3 + DynamoDB."""
    store = store_for(settings, embedded)
    if embedded is not None:
        embedded.mkdir(parents=True, exist_ok=True)
        service = ConsoleService(store, FolderBlobs(embedded), FolderUploads(embedded.resolve(), guard.sign_path),
                                 embedded_policy(settings), settings.jobs_prefix)
        return create_app(service, guard, title=f"codsplat · {embedded}", connect_src="")
    s3 = aws_client(settings, "s3")
    service = ConsoleService(store, S3Blobs(s3, settings.bucket), S3Uploads(s3, settings.bucket),
                             settings.policy, settings.jobs_prefix)
    # the browser PUTs upload parts to S3 itself, and the viewer fetches presigned splat links
    endpoint = urlsplit(s3.meta.endpoint_url)
    return create_app(service, guard, title=f"codsplat · s3://{settings.bucket}",
                      connect_src=f"{endpoint.scheme}://{endpoint.netloc} https://*.amazonaws.com")
