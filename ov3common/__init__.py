"""Shared infrastructure of the OpenVision 3 monorepo: the one home for config loading (``config``), distributed
setup (``dist``), checkpoint I/O (``checkpoint``), logging (``log``), optimiser/schedule (``optim``), robust image and
text decoding (``images``), resumable sampling (``data``) and the embedded toy world (``toyworld``)."""
