"""Pure OCI vocabulary: names, digests, references, media types, errors. No I/O."""
