"""Moved to ``moeframe.schedules`` (the config layer validates schedules); re-exported here for
the import paths of earlier releases."""

from moeframe.schedules import SHAPES, Segment, check_segments, piecewise  # noqa: F401

__all__ = ["SHAPES", "Segment", "check_segments", "piecewise"]
