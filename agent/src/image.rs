//! Images: pulled from OCI registries, verified, unpacked into a cache.
