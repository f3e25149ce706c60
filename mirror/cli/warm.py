"""`mirror warm`: submit a warm job to a running mirror, follow it live, print a summary."""

from __future__ import annotations

import json
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from mirror.config.values import format_size

_FINAL = frozenset({"done", "failed"})
_BAR = 24  # widest progress bar
_NAME = 48  # widest image name column
_REQUEST_TIMEOUT = 30.0
_GIVE_UP_AFTER = 60.0  # seconds of the mirror being unreachable while following a job
_REDRAW_EVERY = 0.1  # seconds between frames on a terminal
_TOTAL_EVERY = 10.0  # seconds between progress lines in a log
_ORDER = {"fetching": 0, "resolving": 1, "failed": 2, "queued": 3, "done": 4}


class Refused(Exception):
    """The mirror answered with an error, or could not be reached."""


class Unreachable(Refused):
    """No answer at all: worth retrying while following a job."""


def read_image_list(path: Path) -> list[str]:
    """One reference per line; blank lines and # comments are skipped. `-` is stdin."""
    text = sys.stdin.read() if str(path) == "-" else path.read_text()
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def run_warm(
    url: str,
    images: Sequence[str],
    platforms: Sequence[str],
    file: Path | None,
    token: str | None,
    poll: float = 0.5,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    tty: bool | None = None,
) -> int:
    """0 when every image was warmed, 1 when some failed, 2 when the mirror refused the job
    or could not be reached, 130 when interrupted (the job carries on in the mirror)."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    wanted = list(images)
    if file is not None:
        try:
            wanted += read_image_list(file)
        except OSError as exc:
            print(f"mirror warm: cannot read {file}: {exc.strerror}", file=err)
            return 2
    if not wanted:
        print("mirror warm: no images given (arguments or --file)", file=err)
        return 2
    client = _Client(url, token)
    body = {"images": wanted, "platforms": list(platforms) or None}
    try:
        accepted = client.request("POST", "/admin/warm", body)
        status_url = str(accepted["status_url"])
    except (Refused, KeyError, TypeError) as exc:
        print(f"mirror warm: the mirror refused the job: {exc}", file=err)
        return 2
    job_id = accepted.get("id")
    queued = accepted.get("images", len(wanted))  # duplicates are warmed once
    print(f"mirror warm: job {job_id}: {queued} image(s) queued", file=err)
    view: _View = _LiveView(err) if (err.isatty() if tty is None else tty) else _LineView(err)
    try:
        job = _follow(client, status_url, poll, view)
    except KeyboardInterrupt:
        print(f"\nmirror warm: stopped following; job {job_id} goes on: {status_url}", file=err)
        return 130
    except Refused as exc:
        print(f"mirror warm: lost the job {job_id}: {exc}", file=err)
        return 2
    print_summary(job, out)
    return 0 if job.get("state") == "done" else 1


def _follow(client: _Client, status_url: str, poll: float, view: _View) -> dict[str, Any]:
    unreachable_since: float | None = None
    while True:
        try:
            job = client.request("GET", status_url)
            unreachable_since = None
        except Unreachable:
            unreachable_since = unreachable_since or time.monotonic()
            if time.monotonic() - unreachable_since > _GIVE_UP_AFTER:
                raise
            time.sleep(poll)
            continue
        view.update(job)
        if job.get("state") in _FINAL:
            return job
        time.sleep(poll)


class _Client:
    def __init__(self, url: str, token: str | None) -> None:
        self._base = (url if "://" in url else f"http://{url}").rstrip("/")
        self._token = token

    def request(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        req = urllib.request.Request(self._base + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=_REQUEST_TIMEOUT) as resp:
                doc = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise Refused(f"{exc.code} {_error_text(exc.read())}") from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Unreachable(f"cannot reach {self._base}: {reason}") from exc
        except ValueError as exc:
            raise Refused(f"{self._base} answered something that is not JSON") from exc
        if not isinstance(doc, dict):
            raise Refused(f"{self._base} answered an unexpected document")
        return doc


def _error_text(body: bytes) -> str:
    """The messages of an OCI error envelope, or the start of whatever came instead."""
    try:
        errors = json.loads(body)["errors"]
        return "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)
    except (ValueError, KeyError, TypeError, AttributeError):
        return body[:200].decode(errors="replace").strip()


# -- rendering -------------------------------------------------------------------------------


def _bar(done: int, total: int, state: str, width: int) -> str:
    fraction = 1.0 if state == "done" else (done / total if total else 0.0)
    filled = min(width, int(fraction * width))
    return "[" + "#" * filled + "-" * (width - filled) + f"] {fraction * 100:3.0f}%"


def _seconds(item: dict[str, Any]) -> float | None:
    try:
        return (
            datetime.fromisoformat(item["finished"]) - datetime.fromisoformat(item["started"])
        ).total_seconds()
    except (KeyError, TypeError, ValueError):
        return None


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3) :]


class _View:
    def update(self, job: dict[str, Any]) -> None:
        raise NotImplementedError


class _LiveView(_View):
    """A terminal: one bar per image and a total bar, redrawn in place."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._drawn = 0
        self._last = 0.0

    def update(self, job: dict[str, Any]) -> None:
        if job.get("state") not in _FINAL and time.monotonic() - self._last < _REDRAW_EVERY:
            return
        self._last = time.monotonic()
        size = shutil.get_terminal_size()
        lines = self._lines(job, max(3, size.lines - 2), size.columns)
        up = f"\x1b[{self._drawn}F" if self._drawn else ""
        self._stream.write(up + "".join(f"\x1b[2K{line}\n" for line in lines) + "\x1b[J")
        self._stream.flush()
        self._drawn = len(lines)

    @staticmethod
    def _lines(job: dict[str, Any], rows: int, columns: int) -> list[str]:
        images: list[dict[str, Any]] = job.get("images", [])
        # A line is name, bar, "done / total" (23) and a state (up to 14), 47 with the rest:
        # narrow terminals shorten the bar before the names.
        bar_width = max(10, min(_BAR, columns - 47 - _NAME))
        name_width = max(12, min(_NAME, columns - 47 - bar_width))
        shown = images
        if len(images) > rows - 1:  # the busy ones first, the rest counted
            shown = sorted(images, key=lambda i: _ORDER.get(i["state"], 9))[: rows - 2]
        lines = [
            f"{_fit(i['image'], name_width):<{name_width}} "
            f"{_bar(i['bytes_done'], i['bytes_total'], i['state'], bar_width)} "
            f"{format_size(i['bytes_done']):>10} / {format_size(i['bytes_total']):<10} "
            f"{i['state']}"
            for i in shown
        ]
        if len(shown) < len(images):
            hidden = [i for i in images if i not in shown]
            counts = {s: sum(i["state"] == s for i in hidden) for s in _ORDER}
            lines.append(
                f"... and {len(hidden)} more: "
                + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
            )
        total = (
            f"{'total':<{name_width}} "
            f"{_bar(job['bytes_done'], job['bytes_total'], job['state'], bar_width)} "
            f"{format_size(job['bytes_done']):>10} / {format_size(job['bytes_total']):<10} "
            f"{job['images_done'] + job['images_failed']}/{job['images_total']} images"
        )
        return [line[:columns] for line in [*lines, total]]


class _LineView(_View):
    """A log or a pipe: one line per image as it finishes and a total now and then."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._reported: set[int] = set()
        self._last_total = time.monotonic()

    def update(self, job: dict[str, Any]) -> None:
        images = job.get("images", [])
        if job.get("state") not in _FINAL and time.monotonic() - self._last_total >= _TOTAL_EVERY:
            self._last_total = time.monotonic()
            print(
                f"... {job['images_done'] + job['images_failed']}/{job['images_total']} images, "
                f"{format_size(job['bytes_done'])} of {format_size(job['bytes_total'])}",
                file=self._stream,
                flush=True,
            )
        for n, image in enumerate(images):
            if image["state"] in _FINAL and n not in self._reported:
                self._reported.add(n)
                what = (
                    f"{image['blobs_done']} blobs, {format_size(image['bytes_done'])}"
                    if image["state"] == "done"
                    else image.get("reason") or "failed"
                )
                print(
                    f"[{len(self._reported)}/{len(images)}] {image['state']:<6} "
                    f"{image['image']}: {what}",
                    file=self._stream,
                    flush=True,
                )
                for note in _notes(image):
                    print(f"warning: {image['image']}: {note}", file=self._stream, flush=True)


def print_summary(job: dict[str, Any], out: TextIO) -> None:
    header = ("IMAGE", "STATE", "PLATFORMS", "BLOBS", "CACHED", "SIZE", "TIME", "REASON")
    rows = [header]
    for i in job.get("images", []):
        seconds = _seconds(i)
        rows.append(
            (
                i["image"],
                i["state"],
                ",".join(i.get("platforms") or []) or "-",
                f"{i['blobs_done']}/{i['blobs_total']}",
                str(i.get("blobs_cached", 0)),
                format_size(i["bytes_total"]),
                "-" if seconds is None else f"{seconds:.1f}s",
                _reason(i),
            )
        )
    widths = [max(len(row[c]) for row in rows) for c in range(len(header) - 1)]
    for row in rows:
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]).rstrip(), file=out)
    seconds = _seconds(job)
    warnings = [
        f"warning: {i['image']}: {note}" for i in job.get("images", []) for note in _notes(i)
    ]
    warned = sum(bool(_notes(i)) for i in job.get("images", []))
    print(
        f"{job['images_total']} image(s): {job['images_done']} done, "
        f"{job['images_failed']} failed; {format_size(job['bytes_done'])}"
        + ("" if seconds is None else f" in {seconds:.1f}s")
        + (f"; {warned} with warnings" if warned else ""),
        file=out,
    )
    # Last, so that a scroll-back shows them: a done image may still lack a platform.
    for line in warnings:
        print(line, file=out)


def _reason(image: dict[str, Any]) -> str:
    return str(image.get("reason") or ("see warning below" if _notes(image) else ""))


def _notes(image: dict[str, Any]) -> list[str]:
    """Warnings for an image that was warmed, e.g. a requested platform missing from its index;
    a failed image has its reason instead."""
    if image.get("state") == "failed":
        return []
    notes = [str(n) for n in image.get("notes") or []]
    missing = image.get("missing_platforms") or []
    if missing and not notes:  # a mirror from before notes existed
        notes = [f"not in the index: {', '.join(missing)}"]
    return notes
