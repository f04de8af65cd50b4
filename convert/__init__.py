"""Converting pretrained Llama-family transformers into KVM / LRNN hybrids (issue #6).

``student, teacher, plan = convert_teacher(path_or_teacher, "K*30", {"kvm": {"chunk_len": 64}})``:
``convert.teacher`` loads the teacher (HF folder or GGUF), ``convert.plan`` lays out the student,
``convert.init`` copies the weights so the student starts equal to the teacher inside the KVM window.
``convert.distill`` trains it towards the teacher (stage 1 attention-output alignment, stage 2 logit
KL, stage 3 cross-entropy; ``run_conversion`` is ``hybrid convert``), ``convert.evaluate`` and
``convert.report`` measure it (perplexity beyond the window, state bytes; ``hybrid convert-report``).
``convert.layer_scores`` scores which layers are most worth keeping as attention (the KL gain of
restoring each alone; ``hybrid convert-scores``, ``hybrid convert --keep-attention N``).
"""

from convert.distill import ConversionSettings, run_conversion
from convert.errors import TeacherError
from convert.init import convert_teacher, init_student
from convert.layer_scores import LayerScores, choose_plan, layer_scores
from convert.plan import LayerPlan, plan_student
from convert.teacher import Teacher, load_teacher

__all__ = ["ConversionSettings", "LayerPlan", "LayerScores", "Teacher", "TeacherError", "choose_plan",
           "convert_teacher", "init_student", "layer_scores", "load_teacher", "plan_student", "run_conversion"]
