"""Context parallelism: the zigzag layout, ring attention (exact forward and backward over gloo), the step
kernels' contracts (npu through the emulator, cuda through a recording fake), and whole training steps:
CP=2 and DP=2 x CP=2 against one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from packer.trainer import npu_emulator
from packer.trainer.attention import attention
from packer.trainer.batching import IGNORE_INDEX, collate
from packer.trainer.context_parallel import (
    CudaStep,
    NpuStep,
    ReferenceStep,
    Ring,
    ring_attention,
    shard_micro_batch,
    zigzag_layout,
)
from packer.trainer.model import build_model, load_model_config
from packer.trainer.train import TrainConfig, check_context_parallel, train
from packer.trainer.varlen import VarlenMeta

from .conftest import FakeCPDataset, FakePackedDataset

TOL = 1e-5

# ---------------------------------------------------------------------------------------------------------
# layout


def test_zigzag_layout_by_hand():
    """N=2, segments [8, 4]: rank 0 holds chunks 0 and 3 of each, rank 1 chunks 1 and 2 (module docstring)."""
    r0, r1 = zigzag_layout([8, 4], 2, 0), zigzag_layout([8, 4], 2, 1)
    assert r0.index_L.tolist() == [0, 1, 6, 7, 8, 11]
    assert r1.index_L.tolist() == [2, 3, 4, 5, 9, 10]
    assert r0.local_lens == r1.local_lens == [4, 2] and r0.half_lens == [2, 1]
    assert r0.lo_L.tolist() == [0, 1, 4] and r0.hi_L.tolist() == [2, 3, 5]
    positions = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3])
    assert positions[r0.index_L].tolist() == [0, 1, 6, 7, 0, 3]
    assert positions[r1.index_L].tolist() == [2, 3, 4, 5, 1, 2]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_zigzag_partitions_the_stream_with_equal_causal_work(n):
    """The ranks' shares tile the stream exactly once, and every rank gets the same number of causal
    (query, key) pairs inside segments: (2N-1)c^2 + c(c+1) per segment of chunk size c."""
    rng = np.random.default_rng(n)
    segs = (rng.integers(0, 6, 12) * 2 * n).tolist()  # zeros included
    shares = [zigzag_layout(segs, n, r) for r in range(n)]
    allidx = torch.cat([s.index_L for s in shares]).sort().values
    assert allidx.tolist() == list(range(sum(segs)))
    seg_of = np.repeat(np.arange(len(segs)), segs)
    pos = np.arange(sum(segs)) - np.repeat(np.cumsum(segs) - segs, segs)
    work = []
    for s in shares:
        idx = s.index_L.numpy()
        work.append(int(sum(pos[i] + 1 for i in idx)))  # query at position p sees p + 1 keys
        assert all(seg_of[a] <= seg_of[b] for a, b in zip(idx[:-1], idx[1:], strict=True))
    assert len(set(work)) == 1
    c = np.array([x // (2 * n) for x in segs])
    assert work[0] == int(((2 * n - 1) * c**2 + c * (c + 1)).sum())


def test_zigzag_refuses_unpadded_segments():
    with pytest.raises(ValueError, match=r"segment 1 has 6 tokens.*packer build --cp-size 2.*multiple of 4"):
        zigzag_layout([8, 6], 2, 0)
    with pytest.raises(ValueError, match="cp_rank 2"):
        zigzag_layout([8], 2, 2)


# ---------------------------------------------------------------------------------------------------------
# step kernels: npu (emulator) and cuda (recording fake) against the exact reference step


def _step_inputs(q_lens, k_lens, Hq=4, Hkv=2, D=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), Hq, D, generator=g).to(dtype)
    k = torch.randn(sum(k_lens), Hkv, D, generator=g).to(dtype)
    v = torch.randn(sum(k_lens), Hkv, D, generator=g).to(dtype)
    dout = torch.randn(sum(q_lens), Hq, D, generator=g).to(dtype)
    return q, k, v, dout


STEP_CASES = [([4, 2, 6], [4, 2, 6], True), ([4, 2, 6], [2, 1, 3], False), ([2, 1, 3], [4, 2, 6], False)]


@pytest.mark.parametrize("q_lens,k_lens,causal", STEP_CASES)
@pytest.mark.parametrize("max_segments", [1024, 2])
def test_npu_step_through_the_emulator_equals_the_reference_step(q_lens, k_lens, causal, max_segments):
    q, k, v, dout = _step_inputs(q_lens, k_lens)
    ref, npu = ReferenceStep(), NpuStep(
        npu_emulator.npu_fusion_attention, npu_emulator.npu_fusion_attention_grad, max_segments=max_segments
    )
    scale = 0.3
    o_r, l_r = ref.forward(q, k, v, q_lens, k_lens, causal, scale)
    o_n, l_n = npu.forward(q, k, v, q_lens, k_lens, causal, scale)
    assert (o_r - o_n).abs().max() <= TOL and (l_r - l_n).abs().max() <= TOL
    for a, b in zip(
        ref.backward(q, k, v, o_r, dout, l_r, q_lens, k_lens, causal, scale),
        npu.backward(q, k, v, o_r, dout, l_r, q_lens, k_lens, causal, scale),
        strict=True,
    ):
        assert (a - b).abs().max() <= TOL


def test_reference_step_stays_fp32_under_autocast():
    """--dtype bf16 runs the model under autocast; the exact step must not drop to bf16 matmuls in its forward
    only (its backward, outside autocast, rebuilds fp32 probabilities against the forward's log-sum-exp)."""
    q, k, v, dout = _step_inputs([32, 32], [32, 32])
    ref = ReferenceStep()
    want = ref.forward(q, k, v, [32, 32], [32, 32], True, 0.25)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ref.forward(q, k, v, [32, 32], [32, 32], True, 0.25)
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grads = ref.backward(q, k, v, want[0], dout, want[1], [32, 32], [32, 32], True, 0.25)
    plain = ref.backward(q, k, v, want[0], dout, want[1], [32, 32], [32, 32], True, 0.25)
    assert all(torch.equal(a, b) for a, b in zip(grads, plain, strict=True))


def test_npu_step_calls_like_mindspeeds_tnd_ring():
    """Diagonal: compressed causal mask, sparse_mode 3, pre_tockens = key count, next_tockens 0. Off-diagonal:
    no mask, sparse_mode 0, pre = next = key count. Cumulative python-int lengths, GQA native."""
    calls = []

    def recording(name, fn):
        def wrapped(*args, **kw):
            calls.append((name, args[3:5], kw))
            return fn(*args, **kw)

        return wrapped

    npu = NpuStep(
        recording("fwd", npu_emulator.npu_fusion_attention),
        recording("bwd", npu_emulator.npu_fusion_attention_grad),
    )
    for q_lens, k_lens, causal in STEP_CASES[:2]:
        q, k, v, dout = _step_inputs(q_lens, k_lens)
        out, lse = npu.forward(q, k, v, q_lens, k_lens, causal, 0.5)
        npu.backward(q, k, v, out, dout, lse, q_lens, k_lens, causal, 0.5)
    (_, (n, layout), diag), (_, _, diag_b), (_, _, off), (_, _, off_b) = calls
    assert (n, layout) == (4, "TND")
    assert diag["sparse_mode"] == 3 and diag["next_tockens"] == 0 and diag["pre_tockens"] == 12
    assert diag["atten_mask"].shape == (2048, 2048) and diag["actual_seq_qlen"] == [4, 6, 12]
    assert off["sparse_mode"] == 0 and off["atten_mask"] is None and off["pre_tockens"] == off["next_tockens"] == 6
    assert off["actual_seq_qlen"] == [4, 6, 12] and off["actual_seq_kvlen"] == [2, 3, 6]
    assert all(type(x) is int for x in off["actual_seq_kvlen"])
    assert diag_b["softmax_max"].shape == (12, 4, 8) and diag_b["attention_in"].dtype == torch.float32
    assert (diag_b["softmax_sum"] == 1).all() and off_b["sparse_mode"] == 0


def test_emulator_rejects_a_narrow_band_in_mode_0():
    q, k, v, _ = _step_inputs([4], [4])
    with pytest.raises(npu_emulator.NpuArgumentError, match="pre_tockens and next_tockens >= the longest"):
        npu_emulator.npu_fusion_attention(
            q, k, v, 4, "TND", scale=1.0, pre_tockens=2, next_tockens=2, sparse_mode=0,
            actual_seq_qlen=[4], actual_seq_kvlen=[4],
        )  # fmt: skip


class FakeVarlenOps:
    """torch.ops.torch_attn._varlen_attn / _varlen_attn_backward with the reference math, recording calls."""

    def __init__(self):
        self.calls = []

    @staticmethod
    def _lens(cu):
        return torch.diff(cu).tolist()

    def forward(self, q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, scale=None, enable_gqa=False):
        self.calls.append(("fwd", cu_q.dtype, cu_k.dtype, max_q, max_k, is_causal, enable_gqa))
        q_lens, k_lens = self._lens(cu_q), self._lens(cu_k)
        assert max_q == max(q_lens) and max_k == max(k_lens)
        out, lse = ReferenceStep().forward(q, k, v, q_lens, k_lens, is_causal, scale)
        return out.to(q.dtype), lse.transpose(0, 1).contiguous(), torch.zeros(2)  # lse (Hq, Tq) like FA2

    def backward(self, dout, q, k, v, out, lse_HT, cu_q, cu_k, max_q, max_k, is_causal, rng, scale=None):
        self.calls.append(("bwd", lse_HT.shape, out.dtype, is_causal))
        lse = lse_HT.transpose(0, 1)
        return ReferenceStep().backward(q, k, v, out, dout, lse, self._lens(cu_q), self._lens(cu_k), is_causal, scale)


def test_cuda_step_contract_with_a_recording_fake():
    fake = FakeVarlenOps()
    cuda, ref = CudaStep((fake.forward, fake.backward)), ReferenceStep()
    for q_lens, k_lens, causal in STEP_CASES:
        q, k, v, dout = _step_inputs(q_lens, k_lens, dtype=torch.bfloat16)
        o_c, l_c = cuda.forward(q, k, v, q_lens, k_lens, causal, 0.5)
        o_r, l_r = ref.forward(q, k, v, q_lens, k_lens, causal, 0.5)
        assert (o_c - o_r).abs().max() <= 1e-2 and (l_c - l_r).abs().max() <= TOL  # out travels in bf16
        for a, b in zip(
            cuda.backward(q, k, v, o_r, dout, l_r, q_lens, k_lens, causal, 0.5),
            ref.backward(q, k, v, o_r.to(q.dtype).float(), dout, l_r, q_lens, k_lens, causal, 0.5),
            strict=True,
        ):
            assert (a - b).abs().max() <= 1e-4
    fwd = [c for c in fake.calls if c[0] == "fwd"]
    assert [c[5] for c in fwd] == [True, False, False]  # causal only on the diagonal step
    assert all(c[1] == c[2] == torch.int32 and c[6] for c in fwd)  # int32 cu_seqlens, GQA native
    assert all(c[1] == (4, 12) or c[1] == (4, 6) for c in fake.calls if c[0] == "bwd")
    with pytest.raises(ValueError, match="float16/bfloat16"):
        cuda.forward(*_step_inputs([4], [4])[:3], [4], [4], True, 0.5)


# ---------------------------------------------------------------------------------------------------------
# ring attention over gloo


def _init(rank: int, world: int, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)


RING_CASES = [
    # (cp size, segment lengths (multiples of 2N), heads q/kv)
    (2, [8, 4, 12, 4], (4, 2)),  # a 4-token segment = 1 token per chunk
    (2, [4, 4, 16], (4, 4)),
    (3, [12, 6, 0, 18], (6, 2)),  # an empty segment
    (4, [8, 16, 24], (4, 1)),
]


def _ring_worker(rank: int, world: int, path: str, steps: list[str]) -> None:
    _init(rank, world, path)
    for n, segs, (Hq, Hkv) in RING_CASES:
        if n != world:
            continue
        g = torch.Generator().manual_seed(sum(segs))
        T, D = sum(segs), 8
        q, dout = torch.randn(T, Hq, D, generator=g), torch.randn(T, Hq, D, generator=g)
        k, v = torch.randn(T, Hkv, D, generator=g), torch.randn(T, Hkv, D, generator=g)
        qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
        ref = attention(qr, kr, vr, VarlenMeta.from_segment_lens(segs, 1, T), "reference")
        ref.backward(dout)
        layout = zigzag_layout(segs, n, rank)
        idx = layout.index_L
        for name in steps:
            kernel = {
                "reference": ReferenceStep(),
                "npu": NpuStep(npu_emulator.npu_fusion_attention, npu_emulator.npu_fusion_attention_grad, 2),
            }[name]
            ql, kl, vl = (x[idx].clone().requires_grad_() for x in (q, k, v))
            out = ring_attention(ql, kl, vl, layout, Ring(None, tuple(range(n)), rank), kernel)
            out.backward(dout[idx])
            for what, a, b in [
                ("out", out, ref[idx]),
                ("dq", ql.grad, qr.grad[idx]),
                ("dk", kl.grad, kr.grad[idx]),
                ("dv", vl.grad, vr.grad[idx]),
            ]:
                err = (a - b).abs().max().item()
                assert err <= TOL, f"cp {n} rank {rank} {name} {segs}: {what} off by {err}"
    dist.destroy_process_group()


@pytest.mark.parametrize("n", [2, 3, 4])
def test_ring_attention_equals_attention_over_the_whole_stream(n, tmp_path):
    """Forward and dq/dk/dv of every rank's share equal those of exact attention over the whole stream,
    with the reference step and with the npu step through the emulator (split 2 segments per call)."""
    steps = ["reference", "npu"] if n == 2 else ["reference"]
    mp.spawn(_ring_worker, args=(n, str(tmp_path / "init"), steps), nprocs=n)


# ---------------------------------------------------------------------------------------------------------
# the model: logits, loss and gradients of CP=2 equal one process's


def _model_worker(rank: int, world: int, path: str, loss_average: str, prefix: str | None = None) -> None:
    from packer.dataset import PackedDataset
    from packer.trainer.train import loss_sum

    _init(rank, world, path)
    ds = FakeCPDataset(n_packs=4, seq_length=64, cp_size=world) if prefix is None else PackedDataset(prefix)
    mb = collate([ds[i] for i in range(2)], ds.seq_length, ds.pad_id, "packed", ds.pad_multiple)
    torch.manual_seed(0)
    model = build_model("tiny", load_model_config("tiny", vocab_size=ds.vocab_size))
    full = model(mb.tokens_T, mb.positions_T, mb.meta, "reference")
    loss_full = loss_sum(full[mb.target_idx_N], mb, loss_average, mb.target_idx_N)
    grads_full = torch.autograd.grad(loss_full, list(model.parameters()))

    ring = Ring(None, tuple(range(world)), rank)
    local = shard_micro_batch(mb, ring)
    logits = model(local.tokens_T, local.positions_T, local.meta, "reference")
    assert (logits - full[local.meta.layout.index_L]).abs().max() <= TOL
    loss = loss_sum(logits[local.target_idx_N], local, loss_average, local.target_idx_N)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    total = loss.detach().clone()
    dist.all_reduce(total)
    assert abs(total.item() - loss_full.item()) <= TOL * max(1.0, abs(loss_full.item()))
    for (name, _), g, gf in zip(model.named_parameters(), grads, grads_full, strict=True):
        g = g.clone()
        dist.all_reduce(g)
        err, scale = (g - gf).abs().max().item(), gf.abs().max().item()
        # a sum of ~1e3 token losses: compare at fp32's resolution of the gradient's own size
        assert err <= TOL * max(1.0, scale), f"{name}: off by {err:.2e} of {scale:.2e}"
    dist.destroy_process_group()


@pytest.mark.parametrize("loss_average", ["token", "sample"])
def test_model_under_cp2_gives_the_logits_loss_and_gradients_of_one_process(loss_average, tmp_path):
    mp.spawn(_model_worker, args=(2, str(tmp_path / "init"), loss_average), nprocs=2)


def test_model_under_cp2_on_real_packs(alpaca_cp2_prefix, tmp_path):
    """Real Alpaca packs built with `packer build --cp-size 2` (GPT-2 tokenizer, 512 tokens): the logits,
    loss and every gradient of CP 2 equal one process's."""
    from packer.dataset import PackedDataset

    ds = PackedDataset(alpaca_cp2_prefix)
    assert ds.cp_size == 2 and ds.pad_multiple == 4
    assert all(int(ds.padded_doc_lens(i).sum()) <= ds.seq_length for i in range(len(ds)))
    mp.spawn(_model_worker, args=(2, str(tmp_path / "init"), "token", alpaca_cp2_prefix), nprocs=2)


def _hand_worker(rank: int, world: int, path: str) -> None:
    """Documents of 1, 3 and 6 real tokens in a row of 16 at CP 2 (padded to 4, 4, 8): the first two have
    chunks that are pad only (1 real token = 1 real chunk of 4). The logits of every real token and the loss
    equal those of the same pack WITHOUT any padding, in one process."""
    from packer.records import Pack
    from packer.trainer.train import loss_sum

    _init(rank, world, path)
    ids = np.array([5, 7, 8, 96, 11, 12, 13, 14, 15, 96], dtype=np.int64)
    mask = np.array([1, 0, 1, 1, 0, 0, 1, 1, 1, 1], dtype=np.uint8)
    pack = Pack(ids=ids, loss_mask=mask, doc_lens=np.array([1, 3, 6], dtype=np.int32))
    plain = collate([pack], 16, 96, "packed", 1)
    padded = collate([pack], 16, 96, "packed", 4)
    assert padded.meta.actual_seq_len == [4, 8, 16]
    real_in_padded = torch.tensor([0, 4, 5, 6, 8, 9, 10, 11, 12, 13])  # where the 10 real tokens sit
    torch.manual_seed(0)
    model = build_model("tiny", load_model_config("tiny", vocab_size=97))
    want = model(plain.tokens_T, plain.positions_T, plain.meta, "reference")[:10]
    local = shard_micro_batch(padded, Ring(None, (0, 1), rank))
    got = model(local.tokens_T, local.positions_T, local.meta, "reference")
    where = {int(g): i for i, g in enumerate(local.meta.layout.index_L)}
    for k, p in enumerate(real_in_padded.tolist()):
        if p in where:
            assert (got[where[p]] - want[k]).abs().max() <= TOL
    loss = loss_sum(got[local.target_idx_N], local, "token", local.target_idx_N).detach()
    dist.all_reduce(loss)
    loss_plain = loss_sum(want[plain.target_idx_N], plain, "token", plain.target_idx_N)
    assert abs(loss.item() - loss_plain.item()) <= TOL * 10
    n_targets = torch.tensor(local.num_targets)
    dist.all_reduce(n_targets)
    assert plain.num_targets == padded.num_targets == int(n_targets) == 6
    dist.destroy_process_group()


def test_short_documents_and_pad_only_chunks_by_hand(tmp_path):
    mp.spawn(_hand_worker, args=(2, str(tmp_path / "init")), nprocs=2)


def test_shard_splits_the_counts_the_loss_divides_by():
    ds = FakeCPDataset(n_packs=2, seq_length=64, cp_size=2)
    mb = collate([ds[0], ds[1]], 64, ds.pad_id, "packed", ds.pad_multiple)
    shares = [shard_micro_batch(mb, Ring(None, (0, 1), r)) for r in range(2)]
    assert sum(s.num_targets for s in shares) == mb.num_targets
    assert [s.num_tokens for s in shares] == [mb.num_tokens, 0]
    assert [s.num_docs for s in shares] == [mb.num_docs, 0]
    assert torch.equal(
        torch.sort(torch.cat([s.labels_T for s in shares])).values, torch.sort(mb.labels_T).values
    )
    # pads follow their document's real tokens and are never targets
    assert mb.num_tokens == sum(len(ds[i].ids) for i in range(2))
    real = torch.zeros(mb.tokens_T.numel(), dtype=torch.bool)
    for row, i in enumerate(range(2)):
        start = row * 64
        for n in ds[i].doc_lens.tolist():
            real[start : start + n] = True
            start += -(-n // ds.pad_multiple) * ds.pad_multiple
    assert int(real.sum()) == mb.num_tokens
    assert (mb.labels_T[:-1][~real[1:]] == IGNORE_INDEX).all()  # no label is a pad token
    assert (mb.tokens_T[real] == torch.from_numpy(np.concatenate([ds[0].ids, ds[1].ids]))).all()


# ---------------------------------------------------------------------------------------------------------
# whole training steps under torchrun


CP_WORKER = """
import sys
sys.path.insert(0, sys.argv[1])
from conftest import FakeCPDataset
from packer.trainer.train import TrainConfig, train
kw = {KW}
cfg = TrainConfig(device="cpu", progress=False, log_jsonl=sys.argv[2], **{"data": "unused", **kw})
train(cfg, dataset=None if cfg.data != "unused" else FakeCPDataset(n_packs=8, seq_length=64, cp_size=2))
"""

STEP = {"steps": 2, "lr": 1e-3, "warmup_steps": 1}


def _torchrun(tmp_path, nproc: int, kw: dict) -> list[dict]:
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    script, log = tmp_path / "worker.py", tmp_path / f"cp{nproc}.jsonl"
    script.write_text(textwrap.dedent(CP_WORKER).replace("{KW}", repr(kw)))
    proc = subprocess.run(
        [torchrun, "--nproc-per-node", str(nproc), "--standalone", str(script), str(Path(__file__).parent), str(log)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in log.read_text().splitlines()]


def _one_process(**kw) -> list[dict]:
    ds = FakeCPDataset(n_packs=8, seq_length=64, cp_size=2)
    ds.cp_size = 1  # the same padded layout, one process
    return train(TrainConfig(data="unused", device="cpu", progress=False, **{**STEP, **kw}), dataset=ds)


def _same(a: list[dict], b: list[dict]) -> None:
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    assert [r["processed_tokens"] for r in a] == [r["processed_tokens"] for r in b]
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-5)
    assert [r["grad_norm"] for r in a] == pytest.approx([r["grad_norm"] for r in b], rel=1e-5)


def test_cp2_trains_like_one_process(tmp_path):
    """2 ranks, context parallel 2: the same loss and pre-clip grad norm, step after step, as one process."""
    _same(_torchrun(tmp_path, 2, {**STEP, "context_parallel_size": 2, "loss_average": "sample"}),
          _one_process(loss_average="sample"))  # fmt: skip


def test_dp2_x_cp2_trains_like_one_process_reading_both_replicas_packs(tmp_path):
    """4 ranks = 2 data-parallel replicas x CP 2: each step reads 2 packs, one per replica; one process with
    micro-batch 2 reads the same 2 packs."""
    _same(_torchrun(tmp_path, 4, {**STEP, "context_parallel_size": 2}), _one_process(micro_batch_size=2))


def test_cp2_trains_like_one_process_on_real_packs(alpaca_cp2_prefix, tmp_path):
    kw = {**STEP, "data": alpaca_cp2_prefix}
    one = train(TrainConfig(device="cpu", progress=False, **kw))
    _same(_torchrun(tmp_path, 2, {**kw, "context_parallel_size": 2}), one)


def test_launch_with_another_cp_size_stops():
    ds = FakeCPDataset(n_packs=2, seq_length=64, cp_size=2)
    with pytest.raises(ValueError, match=r"--context-parallel-size 4.*built for --cp-size 2.*--cp-size 4"):
        check_context_parallel(ds, 4, 64)
    with pytest.raises(ValueError, match="built without --cp-size"):
        check_context_parallel(FakePackedDataset(), 2, 32)
    with pytest.raises(ValueError, match="--seq-length 66 is not a multiple of 2 x"):
        check_context_parallel(ds, 2, 66)
    assert check_context_parallel(ds, 2, 64) == 4 and check_context_parallel(ds, 1, 64) == 4
    with pytest.raises(ValueError, match="cannot run under --context-parallel-size"):
        TrainConfig(data="x", attention="padded", context_parallel_size=2)


# ---------------------------------------------------------------------------------------------------------
# --balance-attention


def test_pack_costs_from_the_index_equal_the_loop(alpaca_prefix):
    from packer.dataset import PackedDataset
    from packer.trainer.train import pack_costs

    ds = PackedDataset(alpaca_prefix)
    for m in (1, 4):
        want = [int((-(-ds.doc_lens(i).astype(np.int64) // m) * m).__pow__(2).sum()) for i in range(len(ds))]
        assert pack_costs(ds, m).tolist() == want
        packs = FakePackedDataset()
        loop = [int((-(-np.asarray(p.doc_lens, np.int64) // m) * m).__pow__(2).sum()) for p in packs.packs]
        assert pack_costs(packs, m).tolist() == loop


def test_balance_attention_trains_and_is_part_of_what_a_resume_must_match(tmp_path):
    from packer.trainer.checkpoint import CheckpointError

    ds = FakeCPDataset(n_packs=8, seq_length=64, cp_size=2)
    ds.cp_size = 1
    cfg = dict(data="unused", device="cpu", progress=False, steps=2, balance_attention=True, micro_batch_size=2)
    logs = train(TrainConfig(**cfg, save=str(tmp_path / "ck")), dataset=ds)
    assert len(logs) == 2 and all(np.isfinite(r["loss"]) for r in logs)
    with pytest.raises((ValueError, CheckpointError), match="balance"):
        train(TrainConfig(**{**cfg, "steps": 3, "balance_attention": False}, resume=str(tmp_path / "ck")), dataset=ds)
