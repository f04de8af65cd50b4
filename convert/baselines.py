"""The training-free baselines a conversion must beat: StreamingLLM's sink + sliding window.

A baseline is the teacher itself with every layer's attention limited to its first ``SINK_LEN``
tokens (kept exactly) and its most recent ``window`` ones: the ``swa`` mixer with ``sink_len``,
whose weights are the teacher's (plan letter ``S``). It is a real model:
``hybrid convert TEACHER OUT --plan 'S*30' --set swa.window=384 --set swa.sink_len=4
--stage1-tokens 0 --stage2-tokens 0`` writes it as a checkpoint folder. The report compares a
student with two of them: the window of the student's own KVM window, and the window whose decode
state takes the student's state bytes (``equal_state_window``).
"""

from __future__ import annotations

from convert.evaluate import state_bytes
from convert.init import init_student
from convert.plan import SINK_LEN, plan_student
from convert.teacher import Teacher
from hybrid.model.model import HybridLM


def sink_window_model(teacher: Teacher, window: int, sink_len: int = SINK_LEN) -> HybridLM:
    """The teacher with every layer's attention reduced to its first ``sink_len`` tokens and its last
    ``window`` ones (weights shared by copy, no training)."""
    n = teacher.recipe.model.n_layers
    plan = plan_student(teacher.recipe, f"S*{n}", {"swa": {"window": window, "sink_len": sink_len}})
    model = init_student(teacher.model, plan)
    return model.to(next(teacher.model.parameters()).dtype).eval()


def equal_state_window(student: HybridLM, teacher: HybridLM, context: int, sink_len: int = SINK_LEN) -> int:
    """The longest sliding window whose decode state after ``context`` tokens (sinks included) takes no
    more bytes than ``student``'s: the teacher's KV cache per token divided into the student's state
    gives the tokens it may hold; a window of w holds the w - 1 tokens before the next query."""
    student_bytes = sum(state_bytes(student, [context])[context].values())
    per_token = sum(state_bytes(teacher, [context])[context].values()) / context
    return max(1, int(student_bytes // per_token) - sink_len + 1)
