"""The field's yardsticks: LAMBADA, HellaSwag, WikiText, enwik8 (one module each) and per-document
perplexity, scored by one batched scorer. Importing the package registers every task."""

from . import enwik8, hellaswag, lambada, wikitext  # noqa: F401  (each registers its task)
from .base import TASKS, get_task  # noqa: F401
