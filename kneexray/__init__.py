"""kneexray: a reproducible knee X-ray osteoporosis classification pipeline."""

# The default class set (params.yaml dataset.classes); the pipeline takes any from params.
DEFAULT_CLASSES = ("normal", "osteopenia", "osteoporosis")

__version__ = "0.1.0"
