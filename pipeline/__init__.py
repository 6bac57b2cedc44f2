"""Learns from an administration's corrections log to flag duplicate and erroneous entries."""

__version__ = "0.1.0"
