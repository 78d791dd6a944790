"""Telling the user: one message per finished job, through SNS (email) or a local sink.

SNS messages carry attributes (`job_id`, `status`, `recipient`) so each email subscription can
filter to its own jobs. Links are presigned and expire within 7 days.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from codsplat.pipeline.errors import InputError

from .records import JobRecord

log = logging.getLogger("codsplat.notify")

ADVICE = {
    "input": "Check that the upload is a video (.mp4/.mov/.mkv/.webm), a .zip of photos or a folder of photos, "
             "and that the job document is valid (`codsplat validate job.json`).",
    "reconstruction": "The frames could not be placed in 3D. Capture again moving slowly around the subject, "
                      "with each view overlapping the last, good light and no motion blur.",
    "quality": "The result was too poor to send. Train longer (train.steps), keep more frames (frames.max), "
               "or capture more views.",
    "compute": "No compute could run the job. It is safe to upload the job document again later.",
    "internal": "Something went wrong on our side; the operators have the logs. Uploading the job again may help.",
}


@dataclass(frozen=True)
class Message:
    subject: str
    body: str
    attributes: dict[str, str | list[str]]


def compose(record: JobRecord, links: dict[str, str]) -> Message:
    if record.state == "SUCCEEDED":
        metrics = (record.result or {}).get("metrics", {})
        lines = [f"Your splat for job {record.job_id} is ready.", ""]
        psnr, ssim, gaussians = (metrics.get(k) for k in ("psnr", "ssim", "gaussians"))
        if psnr is not None:  # a figure the run did not report is left out (a summary may lack any of them)
            lines.append(f"Held-out quality: {psnr:.2f} dB PSNR" + (f", SSIM {ssim:.3f}" if ssim is not None else ""))
        if gaussians is not None:
            lines.append(f"Gaussians: {gaussians:,}")
        if psnr is not None or gaussians is not None:
            lines.append("")
        lines += [f"{name}: {url}" for name, url in links.items()]
        lines += ["", "Links expire within 7 days."]
        subject = f"codsplat: {record.job_id} is ready"
    else:
        error = record.error or {}
        lines = [f"Job {record.job_id} {record.state.lower()}" + (f" at the {error['stage']} stage." if error.get("stage") else "."),
                 "", error.get("message", ""), "", "What to try next: " + error.get("advice", ADVICE["internal"])]
        subject = f"codsplat: {record.job_id} {record.state.lower()}"
    # a list (SNS String.Array): a subscription filtered on any one of the job's addresses gets the message
    return Message(subject[:100], "\n".join(lines).strip() + "\n",
                   {"job_id": record.job_id, "status": record.state, "recipient": list(record.notify) or ["-"]})


class Notifier(Protocol):
    def send(self, message: Message) -> str: ...


class SnsNotifier:
    def __init__(self, client, topic_arn: str):
        self.client, self.topic_arn = client, topic_arn

    def send(self, message: Message) -> str:
        attributes = {k: {"DataType": "String.Array", "StringValue": json.dumps(v)} if isinstance(v, list)
                      else {"DataType": "String", "StringValue": v} for k, v in message.attributes.items()}
        reply = self.client.publish(TopicArn=self.topic_arn, Subject=message.subject, Message=message.body,
                                    MessageAttributes=attributes)
        return reply["MessageId"]


class FileNotifier:
    """Embedded mode: each message is `<job id>.json` in a folder, also appended to `sent.jsonl`
    (one line per message sent, the record of what went out) and logged. Sending a job's message
    twice is a no-op, so the window between sending and marking the record sent is closed here (an
    email cannot be unsent: on AWS that window stays, milliseconds wide)."""

    def __init__(self, folder: Path):
        if folder.is_symlink():  # messages would be written wherever it leads
            raise InputError(f"{folder} is a link; the embedded folder's notifications/ must be a plain folder.")
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def send(self, message: Message) -> str:
        name = f"{message.attributes['job_id']}.json"
        body = to_dict(message)
        target = self.folder / name
        if "/" in name or name.startswith(".") or target.parent != self.folder:  # ids are slugs; refuse anything else
            raise ValueError(f"not a file name for a message: {name[:80]!r}")
        if target.is_file() and not target.is_symlink() and json.loads(target.read_text()).get("attributes") == body["attributes"]:
            return name  # sent before a crash
        tmp = self.folder / f".{name}.tmp"
        tmp.unlink(missing_ok=True)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "w") as fh:
            fh.write(json.dumps(body, indent=2))
        os.replace(tmp, target)  # replaces a link planted at the target, never writes through it
        # one short O_APPEND write: whole lines; O_NOFOLLOW: never appended through a planted link
        with os.fdopen(os.open(self.folder / "sent.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644), "a") as fh:
            fh.write(json.dumps(body) + "\n")
        log.info("notification", extra={"job_id": message.attributes["job_id"], "subject": message.subject})
        return name


def to_dict(message: Message) -> dict[str, Any]:
    return {"subject": message.subject, "body": message.body, "attributes": message.attributes}
