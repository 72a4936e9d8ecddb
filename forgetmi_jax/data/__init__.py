"""Data: cohort schema, synthetic and MIMIC-CXR cohorts, forget sets, noise, tokens, batches.

Heavy dependencies (tensorflow-datasets, grain, nlpaug, transformers) are imported only by the
modules that need them; names below resolve lazily.
"""
import importlib

_EXPORTS = {
    'Cohort': 'cohort', 'read_split_csv': 'cohort',
    'SyntheticConfig': 'synthetic', 'make_synthetic_cohort': 'synthetic',
    'load_mimic_cxr': 'mimic_cxr', 'build_mimic_cxr': 'mimic_cxr',
    'select_forget_subjects': 'forget_sets', 'read_forget_list': 'forget_sets',
    'ForgetSplit': 'forget_sets', 'make_forget_split': 'forget_sets',
    'RetainSampler': 'forget_sets',
    'add_image_noise': 'noise', 'TextNoiser': 'noise',
    'train_wordpiece_tokenizer': 'tokenizer', 'load_tokenizer': 'tokenizer',
    'tokenize': 'pipeline', 'make_arrays': 'pipeline', 'make_source': 'pipeline',
    'ExampleSource': 'pipeline', 'NoisyTokens': 'pipeline', 'make_noisy_tokens': 'pipeline',
    'noisy_token_table': 'pipeline',
    'batches': 'pipeline', 'unlearning_batches': 'pipeline', 'target_batches': 'pipeline',
    'shard': 'pipeline',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f'{__name__}.{_EXPORTS[name]}'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
