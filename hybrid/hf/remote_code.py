"""The modeling file of a folder written by ``hybrid export-hf`` (copied there as ``modeling_kvm_hybrid.py``,
which its ``config.json`` names in ``auto_map``).

It imports the classes from the installed kvm-hybrid toolkit instead of carrying a copy of them:
the layers (KVM with its CPU kernels, the linear RNNs with fla's kernels, attention) are several
thousand lines that a copy would have to keep in step, and with the toolkit's own code an exported
model computes exactly what ``hybrid generate`` computes.
"""

try:
    from hybrid.hf import KVMHybridConfig, KVMHybridForCausalLM
except ImportError as err:
    raise ImportError("this model runs on the kvm-hybrid toolkit, which is not installed here (or is too old): "
                      f"pip install kvm-hybrid ({err})") from err

__all__ = ["KVMHybridConfig", "KVMHybridForCausalLM"]
