"""Bundled benchmark prompt sets and the loaders for every supported prompt-file format."""
