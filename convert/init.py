"""A student initialised from its teacher: RADLADS-style weight transfer (docs/conversion.md §1).

::

    student, teacher, plan = convert_teacher("SmolLM2.gguf", "K*30", {"kvm": {"chunk_len": 64}})

What is copied:

* embedding, every block's two RMSNorms and SwiGLU MLP, final norm and (untied) head: as they are;
* kept layers (``A`` in the plan): the whole attention layer;
* ``kvm`` / ``bswa`` / ``swa`` layers: q/k/v/o with their biases, GQA layout and q/k norms. The new KVM
  parameters start as no-ops: ``merge_gate_proj`` zero (gate 1 + elu(0) = 1), window and state
  temperatures 1 (``state_key_norm``, with the normed read, the identity-affine LayerNorm); token
  shift and value residual are off. Inside the window (the first ``n_bswa_chunks * chunk_len`` tokens) KVM is plain causal
  softmax attention, so **the student's logits equal the teacher's there** (tests check 1e-4 in fp32);
  beyond it only the memory is new. ``swa`` (with ``sink_len``: StreamingLLM) and ``bswa``
  equal the teacher wherever their window and sinks cover the whole past.
* ``gla``: q/k/v/o (the plan gives GLA the teacher's heads and widths, GQA as GLA's kv groups);
  the gate ``gk_proj``, output gate ``g_proj`` and norm keep fla's fresh init.
* ``gated_deltanet``: q and o as they are, k and v repeated over each GQA group (it has no key
  groups); ``a_proj``/``b_proj``/``A_log``/``dt_bias``/convs/gate are fresh.
* ``rwkv7``: r <- q, k and v repeated over the groups, o, when ``H*d == d_model``; the decay, a,
  gate and value LoRAs, token-shift mixes and ``k_k``/``k_a``/``r_k`` are fresh.
* ``mamba2``: nothing; its fused ``in_proj`` (z, x, B, C, dt) has no slot of the teacher's shapes
  (Mamba-in-the-Llama's v->x, k->B, q->C needs ``n_groups = kv heads`` and ``state_size = d``,
  ``expand`` matching ``H*d``: set those and add a copier to ``_COPIERS`` when needed).
* Biases of Qwen2's q/k/v and Qwen3's q/k norms have no counterpart in the LRNN mixers: dropped.

**A memory that does no harm at init: the mean read.** The paper's read puts every slot key through
``state_key_norm`` and, in its published models, zeroes the rotated key dims first; a Llama-family
teacher rotates every dim, so that rule would zero every key. Even keeping the rotated keys, the
norm rescales them, and a converted student then reads its memory unlike anything the teacher
saw. The student instead uses the mean read (``state_read: mean``, docs/kvm.md §7): no norm, a slot
read as the mean of the rotated keys and values that entered it, with log(count) added to its logit.
A slot of one token is that token, so until its first merge the student equals the teacher
everywhere, not only inside the window; after it, a merged slot reads as the mean of its tokens,
weighted by their number. ``python -m convert.experiments init`` measures every choice against the
teacher and the sink + window baselines on the report's held-out domains (docs/conversion.md §4.1).

The student is the sink + window baseline plus a memory: its first ``SINK_LEN`` slots are sinks (the
first tokens, never merged into), and a learned per-head offset on the other slots' logits
(``state_offset``) starts at 0, the read above. At -inf it would leave the sinks and the block window,
which is the ``bswa`` baseline with the same sinks (``tests/test_baselines.py``); training moves it
where the memory helps or hurts.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from blocks.kvm import KVMAttention
from blocks.projection import ProjectedAttention
from convert.errors import TeacherError
from convert.plan import LayerPlan, plan_student
from convert.teacher import Teacher, load_teacher
from hybrid.model.model import HybridLM


@torch.no_grad()
def init_student(teacher: HybridLM, plan: LayerPlan) -> HybridLM:
    """A ``HybridLM`` of ``plan.student`` with every transferable weight copied from ``teacher``.

    Records in ``plan.copied`` which student parameters of each converted layer came from the teacher."""
    student = HybridLM(plan.student.model)
    student.embed.load_state_dict(teacher.embed.state_dict())
    student.final_norm.load_state_dict(teacher.final_norm.state_dict())
    if teacher.lm_head is not None:
        student.lm_head.load_state_dict(teacher.lm_head.state_dict())
    for i, (t_block, s_block) in enumerate(zip(teacher.blocks, student.blocks, strict=True)):
        for name in ("mixer_norm", "mlp_norm", "mlp"):
            getattr(s_block, name).load_state_dict(getattr(t_block, name).state_dict())
        if i not in plan.converted:
            s_block.mixer.load_state_dict(t_block.mixer.state_dict())
            continue
        source, target = t_block.mixer, s_block.mixer
        if not isinstance(source, ProjectedAttention):
            raise TeacherError(f"layer {i}: the teacher's mixer is {type(source).__name__}, not softmax attention")
        copy = _COPIERS.get(plan.student_mixers[i])
        plan.copied[i] = tuple(copy(source, target)) if copy else ()
    return student


def new_parameter_names(student: HybridLM, plan: LayerPlan) -> tuple[str, ...]:
    """The full names of the converted layers' parameters that ``init_student`` did not copy from the
    teacher (KVM's merge gate, temperatures and state offset, an LRNN mixer's gates and decays...)."""
    return tuple(name for i in plan.converted
                 for name, _ in student.blocks[i].mixer.named_parameters(prefix=f"blocks.{i}.mixer")
                 if name.removeprefix(f"blocks.{i}.mixer.") not in plan.copied.get(i, ()))


def _copy_projected(source: nn.Module, target: nn.Module) -> list[str]:
    """KVM / BSWA / SWA: the teacher's projections (and q/k norms); new KVM parameters as no-ops."""
    state = source.state_dict()
    _, unexpected = target.load_state_dict(state, strict=False)
    if unexpected:
        raise TeacherError(f"teacher attention parameters {unexpected} have no place in {type(target).__name__}")
    if isinstance(target, KVMAttention):
        if hasattr(target, "merge_gate_proj"):
            nn.init.zeros_(target.merge_gate_proj.weight)  # gate = 1 + elu(0) = 1
        for name in ("window_temp", "state_temp"):
            if hasattr(target, name):
                nn.init.ones_(getattr(target, name))
        if isinstance(target.state_key_norm, nn.LayerNorm):  # the normed read's: weight 1, bias 0
            target.state_key_norm.reset_parameters()
    return sorted(state)


def _repeat_groups(w: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """(kv_heads*d, ...) -> (heads*d, ...): each kv head repeated for the query heads of its group."""
    return w.unflatten(0, (kv_heads, -1)).repeat_interleave(heads // kv_heads, dim=0).flatten(0, 1)


def _copy_weights(pairs: dict[str, torch.Tensor], target: nn.Module) -> list[str]:
    """Copy each ``name -> tensor`` whose shape matches ``target``'s parameter; returns the names copied."""
    params = dict(target.named_parameters())
    done = []
    for name, value in pairs.items():
        if name in params and params[name].shape == value.shape:
            params[name].copy_(value)
            done.append(name)
    return done


def _copy_gla(source, target) -> list[str]:
    return _copy_weights({f"{p}_proj.weight": getattr(source, f"{p}_proj").weight for p in "qkvo"}, target)


def _copy_with_kv_repeated(source, target, query: str) -> list[str]:
    """Mixers without key groups (Gated DeltaNet, RWKV-7): the teacher's q as ``query``, k and v
    repeated over each GQA group, and o."""
    h, hkv = source.num_heads, source.num_kv_heads
    return _copy_weights({f"{query}.weight": source.q_proj.weight,
                          "k_proj.weight": _repeat_groups(source.k_proj.weight, h, hkv),
                          "v_proj.weight": _repeat_groups(source.v_proj.weight, h, hkv),
                          "o_proj.weight": source.o_proj.weight}, target)


_COPIERS = {"kvm": _copy_projected, "bswa": _copy_projected, "swa": _copy_projected, "gla": _copy_gla,
            "gated_deltanet": functools.partial(_copy_with_kv_repeated, query="q_proj"),
            "rwkv7": functools.partial(_copy_with_kv_repeated, query="r_proj")}


def convert_teacher(teacher: Teacher | str, layers, mixers: dict[str, dict] | None = None, to: str | None = None,
                    n_layers: int | None = None) -> tuple[HybridLM, Teacher, LayerPlan]:
    """``student, teacher, plan``: the teacher (loaded from a path, first ``n_layers`` layers, if not
    already a ``Teacher``), the plan (``convert.plan.plan_student``; ``plan.student`` is the student
    recipe) and the initialised student, in train mode, ready for distillation."""
    if not isinstance(teacher, Teacher):
        teacher = load_teacher(teacher, n_layers=n_layers)
    plan = plan_student(teacher.recipe, layers, mixers, to)
    student = init_student(teacher.model, plan)
    return student.to(next(teacher.model.parameters()).dtype), teacher, plan
