"""vramflow: per-page transformer inference over PDFs, one GPU slot at a time."""

__version__ = "0.1.0"
