"""Examples of ``lightning_bnfreeze``: run them from the repository root (``python -m examples.digits``)."""
