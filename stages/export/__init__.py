"""Exports for outside tools (not pipeline stages): the MotionBench release folder, iMOVE-IT training files
for VLM trainers, and a Hugging Face dataset folder. Pure functions over stage tables plus one media helper
(:mod:`stages.export.media`) that cuts clip files with ffmpeg; the CLI wiring is in ``flows/``."""
