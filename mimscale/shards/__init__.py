"""The shard format: sample keys, extensions, the tar walker, labels, manifest, index; create/verify/inspect."""
