"""Measuring generations: FLOPs, quality metrics, paper metrics, the digit judge and its data."""
