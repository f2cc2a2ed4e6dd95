"""Samples to batches: the epoch order, the resumable stream, transforms, masking, device decode."""
