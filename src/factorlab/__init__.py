"""factorlab: factorized adaptation of neural networks, and a lab for what fine-tuning does to knowledge.

Components live in the package (``factorlab.ocr`` for the out-of-context-reasoning task and model);
runnable experiments live in ``factorlab.recipes`` and are reachable from the ``factorlab`` CLI.
"""

from factorlab.errors import ConfigError, FactorlabError, TrainingDivergedError

__version__ = "0.1.0"

__all__ = ["ConfigError", "FactorlabError", "TrainingDivergedError", "__version__"]
