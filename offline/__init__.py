"""Data preparation apart from the service: the offline corpus (the Python standard library's
docstrings) and the small GPT-2-architecture model trained on it, so that everything runs with no
model or dataset hub."""
