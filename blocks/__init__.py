"""Token mixers (KVM attention, softmax attention baselines, linear-RNN layers) and their states.

Importing this package registers every built-in mixer in ``blocks.registry``.
"""

from blocks import attention, kvm  # noqa: F401  (register the softmax-style mixers)
from blocks import gated_deltanet, rwkv7  # noqa: F401  (register the delta-rule linear-RNN mixers)
from blocks import gla, mamba2  # noqa: F401  (register the GLA-family linear-RNN mixers)
