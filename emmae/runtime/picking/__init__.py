"""The stages of one pick: preprocess -> encode -> cluster / localise / vet -> post-process.

:mod:`.picker` is the public face (prepare -> encode -> pick with a session); the
other modules are its stages. Nothing here reads a folder, writes an output folder or
knows of streams and clusters.
"""
