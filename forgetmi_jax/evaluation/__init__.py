"""Evaluation: classification metrics, membership inference, distance and gaps to the
retrained model, and the metrics.json / report.md / Fig. 3 outputs (REFERENCE 5-6)."""
from forgetmi_jax.evaluation.distance import distance_to_retrain
from forgetmi_jax.evaluation.gaps import METRIC_KEYS, add_gaps, retrain_gaps
from forgetmi_jax.evaluation.metrics import (auc_ovr, classification_metrics, macro_f1,
                                             per_sample_ce, softmax)
from forgetmi_jax.evaluation.mia import batch_mean_losses, logreg_mia, svc_mia
from forgetmi_jax.evaluation.report import (PAPER_TABLE1, markdown_table,
                                            plot_loss_histograms, read_metrics,
                                            render_report_from_json, write_json_atomic,
                                            write_report)

__all__ = [
    'METRIC_KEYS', 'PAPER_TABLE1', 'add_gaps', 'auc_ovr', 'batch_mean_losses',
    'classification_metrics', 'distance_to_retrain', 'logreg_mia', 'macro_f1', 'markdown_table',
    'per_sample_ce', 'plot_loss_histograms', 'read_metrics', 'render_report_from_json',
    'retrain_gaps', 'softmax', 'svc_mia', 'write_json_atomic', 'write_report',
]
