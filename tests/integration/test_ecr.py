"""A private ECR registry as the mirror sees one: Distribution with htpasswd (Basic) auth that
only accepts what moto's GetAuthorizationToken issues, the mirror signing that call with AWS
keys from its environment, and skopeo pulling through the mirror with no credentials."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .clients import Skopeo
from .conftest import LogBook
from .images import Catalog, build_layout
from .mirror_proc import MirrorFactory, RegistryEntry
from .procs import Process, answers, free_port, require_binary, run
from .upstream import REGISTRY_CONFIG

pytestmark = pytest.mark.integration

# What moto's ECR issues for its default account, and so all the registry accepts.
ECR_USER, ECR_PASSWORD = "AWS", "123456789012-auth-token"
TOKEN = base64.b64encode(f"{ECR_USER}:{ECR_PASSWORD}".encode()).decode()
# The mirror knows the registry by its ECR name; only the url leads to 127.0.0.1.
ECR_NAME = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
AWS_SECRET = "integration-dummy-secret"

HTPASSWD_AUTH = """\
auth:
  htpasswd:
    realm: {realm}
    path: {path}
"""


@dataclass
class Moto:
    process: Process
    host: str
    recording: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def calls(self, action: str) -> int:
        """Requests for `action` that reached moto (from its own request recording)."""
        if not self.recording.exists():
            return 0
        lines = self.recording.read_text().splitlines()
        targets = [json.loads(line)["headers"].get("X-Amz-Target", "") for line in lines]
        return sum(t.rpartition(".")[2] == action for t in targets)


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory, logbook: LogBook) -> Iterator[Moto]:
    workdir = tmp_path_factory.mktemp("moto")
    host = f"127.0.0.1:{free_port()}"
    recording = workdir / "requests.jsonl"
    env = {"MOTO_ENABLE_RECORDING": "true", "MOTO_RECORDER_FILEPATH": str(recording)}
    argv = [require_binary("moto_server"), "-H", "127.0.0.1", "-p", host.rpartition(":")[2]]
    process = Process("moto", argv, workdir / "moto.log", env={**_environ(), **env})
    logbook.add("moto", process.log_path)
    process.start()
    try:
        process.wait_ready(lambda: answers(host, "/moto-api/"), timeout=30)
        recording.unlink(missing_ok=True)  # the readiness probes are no one's calls
        yield Moto(process, host, recording)
    finally:
        process.stop()
        logbook.remove("moto")


@pytest.fixture(scope="module")
def ecr_registry(tmp_path_factory: pytest.TempPathFactory, logbook: LogBook) -> Iterator[str]:
    """host:port of a Distribution that wants Basic AWS:<moto's token>, team/app:1.0 pushed."""
    workdir = tmp_path_factory.mktemp("ecr-registry")
    htpasswd = workdir / "htpasswd"
    line = run([require_binary("htpasswd"), "-Bbn", ECR_USER, ECR_PASSWORD]).stdout.strip()
    htpasswd.write_text(line + "\n")
    host = f"127.0.0.1:{free_port()}"
    config = workdir / "registry.yml"
    config.write_text(
        REGISTRY_CONFIG.format(root=workdir / "storage", addr=host)
        + HTPASSWD_AUTH.format(realm="ecr-test", path=htpasswd)
    )
    registry_bin = require_binary("docker-registry", "registry")
    process = Process("ecr-registry", [registry_bin, "serve", str(config)], workdir / "log")
    logbook.add("ecr-registry", process.log_path)
    process.start()
    try:
        process.wait_ready(lambda: answers(host, "/v2/", status=401))
        layout = workdir / "layout"
        build_layout(layout)
        run([
            "skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
            "--preserve-digests", f"--dest-creds={ECR_USER}:{ECR_PASSWORD}",
            f"oci:{layout}:single", f"docker://{host}/team/app:1.0",
        ])  # fmt: skip
        yield host
    finally:
        process.stop()
        logbook.remove("ecr-registry")


def _environ() -> dict[str, str]:
    """This environment less any AWS settings of the machine running the tests."""
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}


def test_skopeo_pulls_a_private_ecr_image_through_the_mirror(
    mirror_factory: MirrorFactory,
    moto: Moto,
    ecr_registry: str,
    skopeo: Skopeo,
    catalog: Catalog,
) -> None:
    url = f"http://{ecr_registry}"
    entry = RegistryEntry(url, aws_region="us-east-1", aws_endpoint_url=moto.url)
    aws = {  # the standard chain's first link; no profile or instance role is consulted
        "AWS_ACCESS_KEY_ID": "AKIDINTEGRATION",
        "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    before = moto.calls("GetAuthorizationToken")
    mirror = mirror_factory(registries={ECR_NAME: entry}, default_registry=ECR_NAME, env=aws)
    conf = skopeo.registries_conf(ECR_NAME, mirror=f"{mirror.host}/{ECR_NAME}")
    for _ in range(2):  # the second pull is served from the cache
        layout = skopeo.copy(conf, f"{ECR_NAME}/team/app:1.0")
        # Pushed from the same deterministic layout as the catalog's `single`.
        assert layout.root_digest == catalog.single.digest
        assert set(catalog.single.all_blobs) <= set(layout.blobs)
    assert moto.calls("GetAuthorizationToken") - before == 1
    log = mirror.process.log_path.read_text()
    assert '"event": "ecr_credentials_issued"' in log
    # Its url is 127.0.0.1, not an ECR host in us-east-1: said once, as a JSON line.
    assert log.count('"event": "ecr_registry_host_unexpected"') == 1
    for secret in (ECR_PASSWORD, TOKEN, AWS_SECRET):
        assert secret not in log
