"""Bytes from anywhere: locations and schemes, bounded retried reads, the node cache, atomic writes."""
