"""kneexray: a reproducible knee X-ray osteoporosis classification pipeline."""

CLASSES = ("normal", "osteopenia", "osteoporosis")

__version__ = "0.1.0"
