"""Token mixers (KVM attention, softmax attention baselines, linear-RNN layers), their states, and
the parts a block is built from (projections, RoPE, norms, short convolutions, the MLP, the
linear-RNN ops and the native CPU kernels).

Importing this package registers every built-in mixer in ``blocks.registry``.
"""

from blocks import attention, kvm  # noqa: F401  (register the softmax-style mixers)
from blocks import gated_deltanet, rwkv7  # noqa: F401  (register the delta-rule linear-RNN mixers)
from blocks import gla, mamba2  # noqa: F401  (register the GLA-family linear-RNN mixers)
