"""Manifest media types and Accept negotiation."""

from __future__ import annotations

from collections.abc import Iterable

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_V1 = "application/vnd.docker.distribution.manifest.v1+json"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
IMAGE_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
# What a registry may answer, for one platform, to a client that rejects an index.
SINGLE_IMAGE_TYPES = IMAGE_TYPES | {DOCKER_V1, DOCKER_V1_SIGNED}
MANIFEST_TYPES = (OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST)

# Sent upstream on every manifest fetch, whatever the client asked for, so that what lands in
# the cache is the origin's own manifest and can serve containerd and skopeo alike.
UPSTREAM_ACCEPT = ", ".join((*MANIFEST_TYPES, "*/*"))


def accepted_types(header_values: Iterable[str]) -> frozenset[str]:
    """All media types named by possibly repeated, comma-joined Accept headers (params dropped)."""
    out: set[str] = set()
    for value in header_values:
        for item in value.split(","):
            media = item.split(";", 1)[0].strip().lower()
            if media:
                out.add(media)
    return frozenset(out)


def is_acceptable(media_type: str, accepted: frozenset[str]) -> bool:
    """No Accept header, or */*, takes anything; otherwise the exact type must be listed."""
    if not accepted or "*/*" in accepted:
        return True
    return media_type.lower() in accepted
