"""Hybrid language models: linear-RNN layers and Key-Value Means attention in one stack.

Each subpackage has one job, and the data paths walk through them one way:

* ``hybrid.model``: a recipe (YAML) -> a validated config -> ``HybridLM`` -> its decoding state.
* ``hybrid.generation``: prompts -> prefill -> sampled tokens, batched without padding.
* ``hybrid.formats``: what goes to disk and comes back: checkpoint folders, training run folders,
  tokenizers, the published paper checkpoints, atomic writes and content hashes.
* ``hybrid.training``: text -> token cache -> packed batches -> the train loop -> resumable checkpoints.
* ``hybrid.evaluation``: perplexity, needle in a haystack, lm-eval tasks, speed and state benchmarks,
  the long-context recall experiment.
* ``hybrid.hf``: the model as Hugging Face transformers classes (``AutoModelForCausalLM``), its
  decoding state as a transformers ``Cache``, and ``export-hf`` folders that load anywhere.
* ``hybrid.cli``: the ``hybrid`` command, above all of these and above ``convert``; nothing imports it.
"""

__version__ = "0.1.0"
