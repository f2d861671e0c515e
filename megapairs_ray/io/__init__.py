"""Storage and shard formats: everything that touches bytes on disk or object storage."""
