"""Out-of-context reasoning (OCR): the synthetic task, the batched attention-only model, its
trainer and the max-margin analysis of Huang et al. (2025)."""

from factorlab.ocr.model import BatchedAttentionOnly
from factorlab.ocr.task import OCRTaskConfig, OCRWorld
from factorlab.ocr.train import OCRConfig, RunResult, train_batched, train_runs

__all__ = [
    "BatchedAttentionOnly",
    "OCRConfig",
    "OCRTaskConfig",
    "OCRWorld",
    "RunResult",
    "train_batched",
    "train_runs",
]
