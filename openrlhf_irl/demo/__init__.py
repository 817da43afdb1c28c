"""Embedded CPU demo of openrlhf_irl: a synthetic task, tiny models, IQ-Learn vs SFT, AfD."""
