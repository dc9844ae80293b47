"""Corpus readers and augmentation."""
