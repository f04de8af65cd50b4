"""Converting pretrained Llama-family transformers into KVM / LRNN hybrids.

``student, teacher, plan = convert_teacher(path_or_teacher, "K*30", {"kvm": {"chunk_len": 64}})``
(``convert.init``): ``convert.teacher`` loads the teacher (HF folder or GGUF, read by
``convert.gguf_reader``), ``convert.plan`` lays out the student, ``convert.init`` copies the weights
so the student starts equal to the teacher inside the KVM window. ``convert.distill`` trains it
towards the teacher in stages whose losses are ``convert.losses`` (stage 1 attention-output
alignment, stage 2 logit KL, stage 3 cross-entropy; ``run_conversion`` is ``hybrid convert``), on
data that includes text sampled from the teacher (``convert.samples``). ``convert.report`` measures
it (``hybrid convert-report``) on held-out kinds of text (``convert.heldout``) against the teacher
and the training-free sink + window baselines (``convert.baselines``), through ``convert.evaluate``
(perplexity and top-1 agreement beyond the window, state bytes) and ``convert.facts`` (factual
prompts). ``convert.samples`` samples text from the teacher, part of the default
distillation data. ``convert.layer_scores`` scores which layers are most worth keeping as
attention (the KL gain of restoring each alone; ``hybrid convert-scores``, ``hybrid convert
--keep-attention N``). ``convert.experiments`` holds the measurements behind the defaults.

The package imports nothing itself: import the module you need.
"""
