"""The fused C kernels of KVM (blocks/native/kvm_cpu.c: the state update and the whole-chunk read)
against the PyTorch code they replace: kernel by kernel, then whole prefills and continuations
with and without them."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from blocks import native
from blocks.kvm import KVMConfig, kvm_attention
from blocks.kvm.codec import SlotCodec, Slots
from blocks.kvm.inference import InferenceRunner
from blocks.kvm.native import NativeHelpersRunner, NativeRunner, norm_args
from blocks.kvm.reads import ReadScales
from blocks.kvm.room import Room
from blocks.kvm.routing import flat_rows, max_over_slots
from blocks.kvm.runner import runner_for
from blocks.kvm.schedule import Update, appending
from blocks.kvm.tokens import RawTokens
from blocks.native import kvm_cpu
from mixer_checks import assert_close
from test_kvm import BUDGETS  # the tiny budgets of the KVM block's own tests

C = 8
built = kvm_cpu.library() is not None


def test_the_kernels_build_where_there_is_a_c_compiler():
    assert built == (shutil.which("cc") is not None or shutil.which("gcc") is not None)


needs_kernels = pytest.mark.skipif(not built, reason="no C compiler here: the PyTorch path runs instead")


def _norm(d: int, bias: bool = True, zero_weight_at: int | None = None) -> torch.nn.LayerNorm:
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(d, bias=bias)
    with torch.no_grad():
        norm.weight.add_(0.5 * torch.randn(d))
        if bias:
            norm.bias.add_(0.5 * torch.randn(d))
        if zero_weight_at is not None:
            norm.weight[zero_weight_at] = 0
    return norm


def _codec(norm, zero_dims: int, **options) -> SlotCodec:
    return SlotCodec(KVMConfig(num_heads=2, chunk_len=C, **options), norm, zero_dims)


NO_SCALES = ReadScales(1.0, None, None)


@needs_kernels
@pytest.mark.parametrize("zero_dims, bias", [(6, True), (6, False), (0, True), (2, True)])
@pytest.mark.parametrize("gate_keys, gate_values", [(True, True), (False, True), (True, False)])
def test_incoming_equals_the_torch_preparation(zero_dims, bias, gate_keys, gate_values):
    norm = _norm(16, bias, zero_weight_at=1)
    codec = _codec(norm, zero_dims, merge_gate_keys=gate_keys, merge_gate_values=gate_values)
    torch.manual_seed(1)
    k = torch.randn(2, 30, 3, 16).transpose(1, 2)[:, :, 5:5 + C]  # (B, H, C, d) with the strides of a projection
    v = torch.randn(2, 3, 40, 12)[:, :, 9:9 + C]
    g = (1 + F.elu(torch.randn(2, 3, 40, 1)))[:, :, 9:9 + C]
    reduced = codec.fewer_routing_dims is not None
    assert reduced == (zero_dims > 2)
    with torch.no_grad():
        keys, gated, routing = kvm_cpu.incoming(k, v, g, *norm_args(codec), zero_dims, gate_keys, gate_values, reduced)
        expected = codec.prepare_keys(k)
        assert_close(keys, expected, 1e-6, "prepared keys")
        assert_close(gated, torch.cat(codec.gated(expected, v, g), -1), 1e-6, "gated key | value")
        assert_close(routing, codec.token_features(expected), 1e-6, "routing features")


@needs_kernels
@pytest.mark.parametrize("use_vlens", [True, False])
@pytest.mark.parametrize("zero_dims, bias", [(6, True), (6, False), (0, True)])
@pytest.mark.parametrize("merges, appended", [(3, 1), (25, 2), (0, 4)])  # a few slots touched; most of them
def test_merge_and_read_equal_index_add_then_the_torch_read(use_vlens, zero_dims, bias, merges, appended):
    norm = _norm(16, bias)
    codec = _codec(norm, zero_dims, use_vlens=use_vlens)
    reduced = codec.fewer_routing_dims is not None
    torch.manual_seed(2)
    cap, num = 24, 20  # room rows, slots in use (the last `appended` of them new)
    sums, lens = torch.randn(2, 3, cap, 16 + 12), torch.rand(2, 3, cap, 1) + 0.5
    target, rows = torch.randint(0, 4, (2, 3, merges)), torch.randn(2, 3, merges, 16 + 12)  # repeated targets
    with torch.no_grad():
        new_sums = sums.reshape(-1, 28).index_add(0, flat_rows(sums, target), rows.reshape(-1, 28)).view_as(sums)
        new_lens = lens if use_vlens else lens.reshape(-1, 1).index_add(
            0, flat_rows(lens, target), torch.ones(2 * 3 * merges, 1)).view_as(lens)
        read_keys, read_values, _ = codec.read(new_sums[..., :16], new_sums[..., 16:], new_lens, torch.float32)
        expected = (read_keys, read_values, codec.slot_features(read_keys))
        views = [torch.full_like(x, float("nan")) for x in expected]
        kvm_cpu.merge_and_read(sums, lens, *views, target, rows, not use_vlens, num, num - appended, *norm_args(codec),
                               zero_dims, use_vlens, reduced)
    assert torch.equal(sums, new_sums) and torch.equal(lens, new_lens), "merges as index_add"
    touched = torch.zeros(2, 3, cap, dtype=torch.bool)
    touched.scatter_(2, target, True)
    touched[:, :, num - appended:num] = True
    for name, got, want in zip(("keys", "values", "features"), views, expected):
        assert_close(got[touched], want[touched], 1e-6, f"read {name}")
        assert got[~touched].isnan().all(), f"slots nobody touched were re-read ({name})"


@needs_kernels
@pytest.mark.parametrize("s, tokens", [(3, 40), (64, 40), (101, 256), (1000, 37)])
def test_route_equals_torch_max_including_ties(s, tokens):
    torch.manual_seed(s)
    x = torch.randn(2, 3, s, tokens).round(decimals=1)  # (B, H, slots, tokens): many ties
    x[0, 0, :, 0] = x[0, 0, :, 0].max() + 1
    x[0, 0, [0, s // 2, s - 1], 0] = x[0, 0, :, 0].max()
    for skip in sorted({0, 1, min(s, 33), s, s + 2}):
        every, best, index = kvm_cpu.route(x, skip)
        assert torch.equal(every, x.amax(-2)), f"the max over every slot, skip={skip}"
        if skip >= s:
            assert (best == -torch.inf).all() and (index == 0).all()
            continue
        expected = max_over_slots(x.clone(), skip)
        assert torch.equal(best, expected[1]) and torch.equal(index, expected[2]), f"skip={skip}"


@needs_kernels
@pytest.mark.parametrize("slots, tokens", [(100, 37), (300, 200)])
@pytest.mark.parametrize("block", [1, 7, 64, 4096])
def test_blocked_routing_equals_routing_the_whole_score_matrix(monkeypatch, slots, tokens, block):
    monkeypatch.setattr(kvm_cpu, "ROUTE_BLOCK", block)
    torch.manual_seed(7)
    room = torch.randint(-3, 4, (2, 3, slots + 20, 10)).float()  # integer features: exact scores, many ties
    slot_features, token_features = room[:, :, :slots], torch.randint(-3, 4, (2, 3, tokens, 10)).float()
    scores = (slot_features @ token_features.transpose(-1, -2)).contiguous()  # (B, H, S, C)
    scratch = torch.empty(2 * 3 * slots * tokens)
    for skip in (0, 1, 9, slots):
        every, best, index = kvm_cpu.best_slots(slot_features, token_features, skip, scratch)
        expected = max_over_slots(scores.clone(), skip)
        assert torch.equal(every, scores.amax(-2)), f"skip={skip}"
        if skip < slots:
            assert torch.equal(best, expected[1]) and torch.equal(index, expected[2]), f"skip={skip}"


@pytest.mark.skipif(not kvm_cpu.blas_kernels(), reason="no C compiler, or torch exports no BLAS sgemm here")
@pytest.mark.parametrize("zero_dims, bias", [(6, True), (0, False)])  # routing on fewer dims, or on all
@pytest.mark.parametrize("options", [{}, {"use_vlens": False, "merge_gate_keys": False, "merge_gate_appends": False},
                                     {"sink_len": 2, "merge_gate_values": False}])
@pytest.mark.parametrize("slots, appends", [(5, 0), (5, 3), (300, 0), (300, 17), (40, 40)])  # 300: blocks of scores
def test_whole_update_in_one_kernel_equals_the_torch_update(zero_dims, bias, options, slots, appends):
    norm = _norm(16, bias)
    config = KVMConfig(num_heads=3, chunk_len=40, state_min_len=slots + appends, **options)
    codec = SlotCodec(config, norm, zero_dims)
    torch.manual_seed(3)
    k = torch.randn(2, 50, 3, 16).transpose(1, 2)[:, :, 5:45]  # (B, H, 40 tokens, d), a projection's strides
    v, g = torch.randn(2, 3, 50, 12)[:, :, 4:44], torch.rand(2, 3, 40, 1) + 0.5
    start = Slots(torch.randn(2, 3, slots, 16), torch.randn(2, 3, slots, 12), torch.rand(2, 3, slots, 1) + 0.5)
    rows, n = slots + appends + 4, slots + appends  # a room with spare rows; slots after the update
    update = Update(0, slots, appending(config, 10_000, 10_000, slots))
    with torch.no_grad():
        got = runner_for(codec, NO_SCALES, (k, v, g), None)
        assert isinstance(got, NativeRunner)
        want = InferenceRunner(codec, NO_SCALES, None)
        for runner in (got, want):
            runner.room = Room.around(codec, start, rows, torch.float32)
            runner.update(update, RawTokens(k, v, g, 0))
    assert slots + update.appends == n
    for name, x, y in zip(("sums", "lens", "read keys", "read values", "features"), got.room.buffers, want.room.buffers):
        assert_close(x[:, :, :n], y[:, :, :n], 1e-5, name)
    if options.get("sink_len"):
        assert torch.equal(got.room.sums[:, :, :2], Room.around(codec, start, rows, torch.float32).sums[:, :, :2]), \
            "sink slots never change"


@needs_kernels
def test_join_of_two_partial_softmaxes_is_the_joint_softmax():
    torch.manual_seed(8)
    b, hkv, g, c, dv = 2, 3, 2, 8, 16
    logits_w, logits_s = torch.randn(b, hkv, g, c, 5), torch.randn(b, hkv, g, c, 7)  # window / state keys per query
    values_w, values_s = torch.randn(b, hkv, g, 5, dv), torch.randn(b, hkv, g, 7, dv)
    joint = torch.cat([logits_w, logits_s], -1).softmax(-1) @ torch.cat([values_w, values_s], -2)
    # laid out as the flash calls return them: a group's window outputs, lse stored rows-last
    o_w = torch.zeros(b, hkv, 4, g, c, dv)
    o_w[:, :, 1] = logits_w.softmax(-1) @ values_w
    lse_w = torch.zeros(b * hkv, g * c, 4).permute(0, 2, 1).view(b, hkv, 4, g, c)
    lse_w[:, :, 1] = logits_w.logsumexp(-1)
    o_s = (logits_s.softmax(-1) @ values_s).reshape(b, hkv * g, c, dv).view(b, hkv, g, c, dv)
    lse_s = logits_s.logsumexp(-1).reshape(b, hkv * g, c).transpose(1, 2).contiguous().transpose(1, 2)
    out = torch.full((b, hkv * g, 3 * c, dv), float("nan"))
    kvm_cpu.join(o_w[:, :, 1], lse_w[:, :, 1], o_s, lse_s.view(b, hkv, g, c), out[:, :, c:2 * c].view(b, hkv, g, c, dv))
    assert_close(out[:, :, c:2 * c].reshape(b, hkv, g, c, dv), joint, 1e-6)
    assert out[:, :, :c].isnan().all() and out[:, :, 2 * c:].isnan().all(), "rows outside the view were written"


@pytest.mark.skipif(not kvm_cpu.blas_kernels(), reason="no C compiler, or torch exports no BLAS sgemm here")
@pytest.mark.parametrize("c, n_slots, window_chunks, groups", [(8, 5, 2, 1), (100, 300, 2, 2), (70, 1, 3, 3)])
def test_chunk_read_is_one_softmax_over_slots_and_window(c, n_slots, window_chunks, groups):
    torch.manual_seed(9)
    b, hkv, d, dv = 2, 2, 16, 12
    hq, w = hkv * groups, window_chunks * c
    q = torch.randn(b, c, hq, d).transpose(1, 2)  # strided, as projected queries
    slot_keys, slot_values = torch.randn(b, hkv, n_slots + 4, d)[:, :, :n_slots], torch.randn(b, hkv, n_slots, dv)
    window_keys, window_values = torch.randn(b, hkv, w + 9, d)[:, :, 9:], torch.randn(b, hkv, w, dv)
    state_scale, window_scale = torch.rand(hq) + 0.2, torch.rand(hq) + 0.2
    out = torch.full((b, hq, 3 * c, dv), float("nan"))
    kvm_cpu.attend_chunk(q, slot_keys, slot_values, window_keys, window_values, state_scale, window_scale,
                         out[:, :, c:2 * c])
    rep = lambda x: x.repeat_interleave(groups, 1)  # noqa: E731
    visible = torch.arange(w)[None, :] <= w - c + torch.arange(c)[:, None]
    logits = torch.cat([(q @ rep(slot_keys).transpose(-1, -2)) * state_scale.view(1, -1, 1, 1),
                        ((q @ rep(window_keys).transpose(-1, -2)) * window_scale.view(1, -1, 1, 1))
                        .masked_fill(~visible, -torch.inf)], -1)
    expected = logits.softmax(-1) @ torch.cat([rep(slot_values), rep(window_values)], 2)
    assert_close(out[:, :, c:2 * c], expected, 1e-5)
    assert out[:, :, :c].isnan().all() and out[:, :, 2 * c:].isnan().all(), "rows outside the chunk were written"


def _room_of(codec: SlotCodec, b: int, hkv: int, slots: int, rows: int, d: int, dv: int) -> Room:
    start = Slots(torch.randn(b, hkv, slots, d), torch.randn(b, hkv, slots, dv), torch.rand(b, hkv, slots, 1) + 0.5)
    return Room.around(codec, start, rows, torch.float32)


@pytest.mark.skipif(not kvm_cpu.blas_kernels(), reason="no C compiler, or torch exports no BLAS sgemm here")
@pytest.mark.parametrize("c, groups, options", [(40, 2, {}), (130, 1, {"use_vlens": False, "sink_len": 2}),
                                                (40, 3, {"merge_gate_appends": True, "merge_gate_keys": False})])
def test_a_run_of_chunks_in_one_call_equals_its_updates_and_reads_in_turn(c, groups, options):
    """kvm_run_chunks schedules the same per-head update and per-block read code as a task graph:
    its results must be those of ``absorb`` then ``attend_chunk`` chunk after chunk, bit for bit."""
    norm = _norm(16)
    codec = SlotCodec(KVMConfig(num_heads=2 * groups, num_kv_heads=2, chunk_len=c, **options), norm, 6)
    b, hkv, d, dv, slots = 2, 2, 16, 12, 7
    hq, appends = hkv * groups, [-1, 3, 0, c, 2, -1]  # -1: no update at that boundary; c: every token appends
    n, window = len(appends), 2 * c
    torch.manual_seed(4)
    q = torch.randn(b, n * c, hq, d).transpose(1, 2)  # (B, Hq, n*C, d), a projection's strides
    k, v = torch.randn(b, hkv, (n + 2) * c, d), torch.randn(b, hkv, (n + 2) * c, dv)
    g = torch.rand(b, hkv, (n + 2) * c, 1) + 0.5
    scales = torch.rand(hq) + 0.2, torch.rand(hq) + 0.2
    cap = slots + sum(max(a, 0) for a in appends) + 3
    with torch.no_grad():
        torch.manual_seed(5)
        one = _room_of(codec, b, hkv, slots, cap, d, dv)
        torch.manual_seed(5)
        turns = _room_of(codec, b, hkv, slots, cap, d, dv)
        config = codec.config
        flags = (codec.zero_dims, config.merge_gate_keys, config.merge_gate_values, True, config.sink_len)
        got = torch.full((b, hq, n * c, dv), float("nan"))
        kvm_cpu.run_chunks(q, got, k, v, g, appends, slots, *scales, *norm_args(codec), *flags,
                           config.merge_gate_appends, config.use_vlens, *one.buffers)
        want, num = torch.full_like(got, float("nan")), slots
        for j, n_append in enumerate(appends):
            if n_append >= 0:  # the chunk before chunk j's window leaves it
                leaving = (slice(None), slice(None), slice(j * c, (j + 1) * c))
                kvm_cpu.absorb(k[leaving], v[leaving], g[leaving], *norm_args(codec), *flags[:4], flags[4], n_append,
                               config.merge_gate_appends, config.use_vlens, *turns.buffers, num)
                num += n_append
            window_rows = slice((j + 1) * c, (j + 1) * c + window)
            kvm_cpu.attend_chunk(q[:, :, j * c:(j + 1) * c], turns.read_keys[:, :, :num], turns.read_values[:, :, :num],
                                 k[:, :, window_rows], v[:, :, window_rows], *scales, want[:, :, j * c:(j + 1) * c])
    assert torch.equal(got, want), "outputs"
    for name, x, y in zip(("sums", "lens", "read keys", "read values", "features"), one.buffers, turns.buffers):
        assert torch.equal(x[:, :, :num], y[:, :, :num]), name
    with pytest.raises(ValueError, match="do not fit"):  # more appends than the room holds
        kvm_cpu.run_chunks(q, got, k, v, g, [c] * n, slots, *scales, *norm_args(codec), *flags,
                           config.merge_gate_appends, config.use_vlens, *one.buffers)


@needs_kernels
def test_wrappers_refuse_what_the_kernels_cannot_read():
    with pytest.raises(ValueError, match="float32"):
        kvm_cpu.route(torch.randn(1, 2, 5, 8, dtype=torch.float64), 0)
    with pytest.raises(ValueError, match="contiguous"):
        kvm_cpu.route(torch.randn(1, 2, 8, 5).transpose(-1, -2), 0)


def attend_in_splits(q, k, v, g, config: KVMConfig, splits: list[int], **layer):
    """``kvm_attention`` over consecutive calls of ``splits`` tokens, each continuing the state of the
    last; ``layer``: its keyword arguments (norm, temperatures) -> (output (B, Hq, T, dv), final state)."""
    outs, state, at = [], None, 0
    for n in splits:
        part = slice(at, at + n)
        out, state = kvm_attention(q[:, :, part], k[:, :, part], v[:, :, part], g[:, :, part], config, state, **layer)
        outs.append(out)
        at += n
    return torch.cat(outs, 2), state


OPTIONS = [dict(), dict(use_vlens=False, sink_len=1), dict(sink_len=3, merge_gate_appends=True),
           dict(merge_gate_keys=True, merge_gate_initial_state=True), dict(rope_partial_dim=0)]


@needs_kernels
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("blas", [True, False])  # chunks read and updated with sgemm in C, or flash calls + a C join
def test_attention_with_the_kernels_equals_the_torch_path(monkeypatch, budget, options, kv_heads, blas):
    if not blas:
        monkeypatch.setattr(kvm_cpu, "blas_kernels", lambda: False)
    runs, run_chunks = [], kvm_cpu.run_chunks
    monkeypatch.setattr(kvm_cpu, "run_chunks", lambda *args: runs.append(len(args[5])) or run_chunks(*args))
    cfg = KVMConfig(num_heads=4, num_kv_heads=kv_heads, chunk_len=C, **{"rope_partial_dim": 4, **options},
                    **BUDGETS[budget])
    torch.manual_seed(5)
    t = 11 * C + 3
    q, k, v = torch.randn(2, 4, t, 16), torch.randn(2, kv_heads, t, 16), torch.randn(2, kv_heads, t, 16)
    g = 1 + F.elu(torch.randn(2, kv_heads, t, 1))
    norm, temps = _norm(16), (1 + 0.2 * torch.randn(4), 1 + 0.2 * torch.randn(4))

    def run(splits):
        return attend_in_splits(q, k, v, g, cfg, splits, state_key_norm=norm, window_temp=temps[0], state_temp=temps[1])

    for splits in ([t], [2 * C + 3, 5 * C + 1, 4 * C - 1]):
        with torch.inference_mode():
            fused, fused_state = run(splits)
            with monkeypatch.context() as m:
                m.setattr(kvm_cpu, "library", lambda: None)
                plain, plain_state = run(splits)
        assert_close(fused, plain, 1e-5, f"output, splits {splits}")
        for name, value in fused_state.state_dict().items():
            assert_close(value, plain_state.state_dict()[name], 1e-5, f"state '{name}', splits {splits}")
    assert (sum(runs) > 0) == blas, "with the BLAS kernels, whole chunks run in one call"


@needs_kernels
def test_the_kernels_run_only_where_they_apply():
    q = torch.randn(1, 2, 4 * C, 16)

    def native_for(norm=None, dtype=torch.float32, **options):
        codec = SlotCodec(KVMConfig(num_heads=2, chunk_len=C, **options), norm or _norm(16), 0)
        return isinstance(runner_for(codec, NO_SCALES, (q.to(dtype),), None), (NativeRunner, NativeHelpersRunner))

    with torch.no_grad():
        assert native_for()
        assert not native_for(bf16_state_values=True)
        assert not native_for(torch.nn.RMSNorm(16))
        assert not native_for(dtype=torch.bfloat16)
    assert not native_for(), "with autograd on the update must stay differentiable"


@needs_kernels
def test_a_fresh_cache_builds_the_library_once(monkeypatch, tmp_path):
    monkeypatch.setenv("KVM_NATIVE_CACHE", str(tmp_path))
    assert native.load.__wrapped__("kvm_cpu") is not None
    built = list(tmp_path.glob("kvm_cpu-*.so"))
    assert len(built) == 1, "one library per source, flags and machine"
    stamp = built[0].stat().st_mtime_ns
    assert native.load.__wrapped__("kvm_cpu") is not None
    assert built[0].stat().st_mtime_ns == stamp, "a cached build was rebuilt"


def test_kvm_native_0_turns_the_kernels_off(monkeypatch):
    monkeypatch.setenv("KVM_NATIVE", "0")
    assert native.load.__wrapped__("kvm_cpu") is None


def test_a_failing_build_warns_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("KVM_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", shutil.which("false") or "/bin/false")
    with pytest.warns(UserWarning, match="building native kvm_cpu kernels failed"):
        assert native.load.__wrapped__("kvm_cpu") is None
    assert not list(tmp_path.glob("*.so")), "a failed build left a library behind"


@needs_kernels
@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "drop the record", "edit the record"])
def test_a_cached_library_that_does_not_match_its_record_is_rebuilt(monkeypatch, tmp_path, damage):
    """The sha256 recorded beside a library is checked before it is loaded; a mismatch rebuilds it."""
    monkeypatch.setenv("KVM_NATIVE_CACHE", str(tmp_path))
    assert native.load.__wrapped__("kvm_cpu") is not None
    library = next(tmp_path.glob("kvm_cpu-*.so"))
    record = native.record_of(library)
    good = library.read_bytes()
    assert native.verified(library)
    if damage == "flip a byte":
        data = bytearray(good)
        data[len(data) // 2] ^= 0xFF
        library.write_bytes(bytes(data))
    elif damage == "truncate":
        library.write_bytes(good[:100])
    elif damage == "drop the record":
        record.unlink()
    else:
        record.write_text("0" * 64 + "\n")
    assert not native.verified(library)
    assert native.load.__wrapped__("kvm_cpu") is not None
    assert native.verified(library), "the damaged library was loaded, not rebuilt"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([library.name, record.name]), "leftovers"
