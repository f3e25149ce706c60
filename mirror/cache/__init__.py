"""The caching policy: services that combine the local store with the upstream client."""
