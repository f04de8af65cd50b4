"""The model in Hugging Face transformers: ``import hybrid.hf`` registers ``KVMHybridConfig`` and
``KVMHybridForCausalLM`` with ``AutoConfig`` and ``AutoModelForCausalLM`` (``model_type: kvm_hybrid``),
so that ``AutoModelForCausalLM.from_pretrained(checkpoint_folder)`` loads the toolkit's own checkpoint
folders in this process.

``hybrid export-hf`` (``hybrid.hf.export``) writes a folder that any process loads with
``trust_remote_code=True``: its modeling file (``hybrid.hf.remote_code``) imports this package from
the installed toolkit.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from hybrid.formats.hf_config import MODEL_TYPE
from hybrid.hf.cache import HybridCache
from hybrid.hf.config import KVMHybridConfig
from hybrid.hf.modeling import KVMHybridForCausalLM

AutoConfig.register(MODEL_TYPE, KVMHybridConfig, exist_ok=True)
AutoModelForCausalLM.register(KVMHybridConfig, KVMHybridForCausalLM, exist_ok=True)

__all__ = ["HybridCache", "KVMHybridConfig", "KVMHybridForCausalLM"]
