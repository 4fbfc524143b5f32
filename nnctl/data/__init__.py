"""Data: sources, the one image decoder, the store and batches, the preprocessing record, the cache, augmentation."""
