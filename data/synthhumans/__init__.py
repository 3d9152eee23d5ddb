"""SynthHumans: procedural articulated people rendered analytically with exact labels.

``render_sample(seed, height, width, max_people)`` returns one image with its labels in memory;
``generate_dataset(out, num, ...)`` writes the raw file layout (see ``writer``). CLI:
``python -m data.synthhumans --out DIR --num N``; contact sheet:
``python -m data.synthhumans.contact_sheet --root DIR --out sheet.png``.
"""

from data.synthhumans.body import KEYPOINT_NAMES, RENDERED_PART_IDS
from data.synthhumans.scene import render_sample
from data.synthhumans.writer import generate_dataset, sample_rng

__all__ = ["KEYPOINT_NAMES", "RENDERED_PART_IDS", "generate_dataset", "render_sample", "sample_rng"]
