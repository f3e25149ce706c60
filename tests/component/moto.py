"""moto's server as a real process for the AWS APIs the mirror calls, counting calls by action.

moto's recorder (MOTO_ENABLE_RECORDING) appends every request it serves to a JSON-lines file;
`calls("GetAuthorizationToken")` counts them there, so a test counts what reached AWS, not
what the mirror meant to send.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

from .harness import closed_port

# What moto's ECR issues for its default account: base64 of "AWS:<account>-auth-token".
ECR_USER = "AWS"
ECR_PASSWORD = "123456789012-auth-token"
PART_MIN = 256 * 1024


class MotoServer:
    def __init__(self, workdir: Path) -> None:
        self.port = closed_port()
        self.recording = workdir / "moto-requests.jsonl"
        self.log_path = workdir / "moto.log"
        env = {
            **os.environ,
            "MOTO_ENABLE_RECORDING": "true",
            "MOTO_RECORDER_FILEPATH": str(self.recording),
            # S3's smallest part is 5 MiB; tests cut blobs of a MiB or two into parts.
            "S3_UPLOAD_PART_MIN_SIZE": str(PART_MIN),
        }
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                ["moto_server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        try:
            self._wait_ready(within=30.0)
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def calls(self, action: str) -> int:
        """Requests for `action` (X-Amz-Target "<service>.<action>") since the last reset."""
        if not self.recording.exists():
            return 0
        count = 0
        for line in self.recording.read_text().splitlines():
            target = json.loads(line)["headers"].get("X-Amz-Target", "")
            count += target.rpartition(".")[2] == action
        return count

    def reset(self) -> None:
        self.recording.unlink(missing_ok=True)  # the recorder opens it anew for each request

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def _wait_ready(self, within: float) -> None:
        deadline = time.monotonic() + within
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto_server exited: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1.0):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not answer within {within}s") from None
                time.sleep(0.05)
        self.reset()  # the readiness probe is not a call anyone should count
