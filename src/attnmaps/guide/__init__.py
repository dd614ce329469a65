"""Mask-guided attention: a spurious-cue benchmark for the guidance losses of
:mod:`attnmaps.losses`."""
