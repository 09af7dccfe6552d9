"""flexjit's CUDA entry points from Python. Without a GPU (torch.cuda.is_available() false) a CUDA
tensor cannot even be made, so what runs everywhere is: the CUDA kernel is registered, the op's
schema is the public one, the CUDA kernels' errors when dispatched to without CUDA tensors, the
wrappers refusing CUDA tensors for the CPU-only calls, and create_block_mask's device argument.
With a GPU, the CUDA kernels against PyTorch's flex_attention on the same device (bf16, causal
BlockMask, ALiBi, GQA, LSE; prefill, decode and a paged cache). Skips (visibly) when the op library is not built."""

import os

import pytest
import torch

import flexjit

if flexjit.library_path() is None:
    pytest.skip(f"libflexjit_torch_ops.so not found (FLEXJIT_TORCH_OPS={os.environ.get('FLEXJIT_TORCH_OPS')!r}, "
                "else build/): cmake --build build --target flexjit_torch_ops", allow_module_level=True)

# The public contract (runtime/torch/op_schema.h): never renamed or reordered, only appended to.
FLEX_ATTENTION_SCHEMA = (
    'flexjit::flex_attention(Tensor query, Tensor key, Tensor value, str score_mod="", str mask_mod="", '
    "Tensor[]? buffers=None, str[]? buffer_names=None, str[]? param_names=None, float[] param_values=[], "
    "float? scale=None, bool enable_gqa=False, bool return_lse=False, Tensor? kv_num_blocks=None, "
    "Tensor? kv_indices=None, Tensor? full_kv_num_blocks=None, Tensor? full_kv_indices=None, "
    "int q_block_size=128, int kv_block_size=128, int BLOCK_M=0, int BLOCK_N=0, int USE_AMX=-1, "
    "int PARTITION_SIZE=0, bool FORCE_USE_FLEX_ATTENTION=False, int USE_DPBF16=-1, int USE_WGMMA=-1) "
    "-> (Tensor out, Tensor lse)")

CUDA_KEYSET = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
# The CUDA-only build's op library (FLEXJIT_TORCH_OPS=build-gpu/...) has flex_attention's CUDA and
# Meta kernels only: no CPU kernels, no BlockMask builder.
FULL_LIBRARY = torch._C._dispatch_has_kernel_for_dispatch_key("flexjit::flex_attention", "CPU")
needs_full = pytest.mark.skipif(not FULL_LIBRARY, reason="the CUDA-only op library has no CPU kernels")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CUDA kernel cannot run here")


def test_flex_attention_has_cuda_and_meta_kernels_and_the_public_schema():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("flexjit::flex_attention", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("flexjit::flex_attention", "Meta")
    assert str(torch.ops.flexjit.flex_attention.default._schema) == FLEX_ATTENTION_SCHEMA


def test_cuda_kernel_refuses_tensors_that_are_not_on_cuda():
    q = torch.randn(1, 2, 64, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="the CUDA kernel got q, k and v on cpu"):
        torch.ops.flexjit.flex_attention.default.redispatch(CUDA_KEYSET, q, q, q)


@needs_full
def test_cuda_backward_says_there_is_none_yet():
    q = torch.randn(1, 2, 64, 64)
    lse = torch.zeros(1, 2, 64)
    with pytest.raises(ValueError, match="runs on CPU only .* no CUDA backward yet"):
        torch.ops.flexjit.flex_attention_backward.default.redispatch(CUDA_KEYSET, q, q, q, q, q, lse)


class _OnCuda(torch.Tensor):
    """A CPU tensor that says it is on cuda:0: what the wrappers see of a CUDA tensor, on a machine
    where none can be made (they must refuse it before calling the op)."""

    @property
    def device(self):
        return torch.device("cuda", 0)


def _on_cuda(t):
    return torch.Tensor._make_subclass(_OnCuda, t)


def test_paged_flex_attention_has_cuda_and_meta_kernels():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("flexjit::paged_flex_attention", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("flexjit::paged_flex_attention", "Meta")
    q = torch.randn(1, 2, 1, 64, dtype=torch.bfloat16)
    pages = torch.randn(4, 16, 2, 64, dtype=torch.bfloat16)
    table, lens = torch.zeros(1, 4, dtype=torch.int32), torch.full((1,), 16, dtype=torch.int32)
    with pytest.raises(ValueError, match="the CUDA kernel got q, k and v on cpu"):
        torch.ops.flexjit.paged_flex_attention.default.redispatch(CUDA_KEYSET, q, pages, pages, table, lens)


def test_cpu_only_calls_refuse_cuda_tensors_with_the_fix():
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"flash_attn_varlen_func: q is on cuda:0"):
        flexjit.flash_attn_varlen_func(_on_cuda(torch.randn(8, 2, 64)), torch.randn(8, 2, 64), torch.randn(8, 2, 64),
                                       cu, cu, 8, 8)
    out, lse = torch.randn(2, 8, 64), torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"merge_attention_states: out_b is on cuda:0"):
        flexjit.merge_attention_states(out, lse, _on_cuda(out), lse)


@needs_full
def test_create_block_mask_takes_a_device():
    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    bm = flexjit.create_block_mask(causal, 2, 4, 256, 256, device=torch.device("cpu"))
    assert bm.kv_num_blocks.device.type == "cpu" and bm.kv_num_blocks.shape == (2, 4, 2)


# ---- on a GPU: the CUDA kernel against PyTorch's flex_attention on the same device ----


def _alibi(slopes):
    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)
    return alibi


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@needs_gpu
@pytest.mark.parametrize("wgmma", [0, 1, 2])
@pytest.mark.parametrize("L", [97, 256, 1000])
def test_cuda_matches_torch_flex_attention(L, wgmma):
    # wgmma 1: the sm_90a engine, required (an error where it cannot run); 2: its pipelined schedule;
    # 0: mma.sync.
    if wgmma and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma engine needs an sm_90 GPU")
    from torch.nn.attention.flex_attention import create_block_mask
    from torch.nn.attention.flex_attention import flex_attention as torch_flex

    torch.manual_seed(0)
    dev = torch.device("cuda")
    B, HQ, HKV, D = 2, 8, 2, 128
    q = torch.randn(B, HQ, L, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(B, HKV, L, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(B, HKV, L, D, device=dev, dtype=torch.bfloat16)
    slopes = torch.exp2(-8.0 * torch.arange(1, HQ + 1, device=dev) / HQ)
    bm = (flexjit.create_block_mask(_causal, None, None, L, L, device=dev) if FULL_LIBRARY
          else create_block_mask(_causal, None, None, L, L, device=dev))
    out, lse = flexjit.flex_attention(q, k, v, score_mod=_alibi(slopes), block_mask=bm, enable_gqa=True,
                                      return_lse=True, kernel_options={"USE_WGMMA": wgmma})
    ref_bm = create_block_mask(_causal, None, None, L, L, device=dev)
    ref, ref_lse = torch_flex(q.float(), k.float(), v.float(), score_mod=_alibi(slopes), block_mask=ref_bm,
                              enable_gqa=True, return_lse=True)
    assert out.device == q.device and out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=1e-2, rtol=1e-3)


@needs_gpu
def test_cuda_errors_name_the_fix():
    dev = torch.device("cuda")
    q = torch.randn(1, 2, 64, 64, device=dev)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        flexjit.flex_attention(q, q, q)
    qb = q.bfloat16()
    with pytest.raises(ValueError, match="buffer 'bias' is on cpu but query is on cuda"):
        flexjit.flex_attention(qb, qb, qb, score_mod="score + bias[h]", buffers={"bias": torch.zeros(2)})
    with pytest.raises(ValueError, match="q, k and v must be on one device"):
        flexjit.flex_attention(qb, qb.cpu(), qb)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("Lq,L", [(1, 1), (1, 4097), (4, 1000), (16, 300)])
def test_cuda_decode_matches_torch_flex_attention(Lq, L, dtype):
    """Lq <= 16 runs the CUDA flash-decoding kernel (split-KV partitions + merge); fp32 K/V on CUDA
    cores, held to fp32 tolerances."""
    from torch.nn.attention.flex_attention import flex_attention as torch_flex

    torch.manual_seed(1)
    dev = torch.device("cuda")
    B, HQ, HKV, D = 2, 32, 8, 128
    q = torch.randn(B, HQ, Lq, D, device=dev, dtype=dtype)
    k = torch.randn(B, HKV, L, D, device=dev, dtype=dtype)
    v = torch.randn(B, HKV, L, D, device=dev, dtype=dtype)
    slopes = torch.exp2(-8.0 * torch.arange(1, HQ + 1, device=dev) / HQ)
    out, lse = flexjit.flex_attention(q, k, v, score_mod=_alibi(slopes), enable_gqa=True, return_lse=True)
    ref, ref_lse = torch_flex(q.double(), k.double(), v.double(), score_mod=_alibi(slopes), enable_gqa=True,
                              return_lse=True)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4 if dtype == torch.float32 else 1e-2, rtol=1e-3)


@needs_gpu
@pytest.mark.parametrize("lens_on_cpu", [True, False])
def test_cuda_paged_decode_matches_the_contiguous_reference(lens_on_cpu):
    """A paged cache (shuffled pages, an empty slot) against torch's flex_attention on the same keys
    laid out contiguously, at absolute positions (causal)."""
    from torch.nn.attention.flex_attention import flex_attention as torch_flex

    torch.manual_seed(2)
    dev = torch.device("cuda")
    B, HQ, HKV, D, P, Lq = 3, 8, 2, 128, 16, 2
    seq = [1000, 0, 37]
    pages_per = [(n + P - 1) // P for n in seq]
    num_pages = sum(pages_per) + 2
    k_cache = torch.randn(num_pages, P, HKV, D, device=dev, dtype=torch.bfloat16)
    v_cache = torch.randn(num_pages, P, HKV, D, device=dev, dtype=torch.bfloat16)
    perm = torch.randperm(num_pages).tolist()
    table = torch.zeros(B, max(pages_per), dtype=torch.int32)
    nxt = 0
    for b in range(B):
        for j in range(pages_per[b]):
            table[b, j] = perm[nxt]
            nxt += 1
    lens = torch.tensor(seq, dtype=torch.int32)
    q = torch.randn(B, HQ, Lq, D, device=dev, dtype=torch.bfloat16)
    out = flexjit.paged_flex_attention(q, k_cache, v_cache, table.to(dev), lens if lens_on_cpu else lens.to(dev),
                                       mask_mod=_causal)
    for b in range(B):
        n = seq[b]
        if n == 0:
            assert torch.count_nonzero(out[b]) == 0
            continue
        idx = table[b, :pages_per[b]].to(dev).long()
        kb = k_cache[idx].reshape(-1, HKV, D)[:n].permute(1, 0, 2)[None].float()
        vb = v_cache[idx].reshape(-1, HKV, D)[:n].permute(1, 0, 2)[None].float()
        off = n - Lq

        def causal_abs(bb, h, q_idx, kv_idx):
            return q_idx + off >= kv_idx

        from torch.nn.attention.flex_attention import create_block_mask
        bm = create_block_mask(causal_abs, None, None, Lq, n, device=dev)
        ref = torch_flex(q[b:b + 1].float(), kb, vb, block_mask=bm, enable_gqa=True)
        torch.testing.assert_close(out[b:b + 1].float(), ref, atol=2e-2, rtol=2e-2)


@needs_gpu
@pytest.mark.parametrize("paged", [False, True])
def test_cuda_decode_call_captures_in_a_cuda_graph(paged):
    """A decode call with fixed shapes, its kernel compiled by an earlier call, replays from a CUDA
    graph: no host synchronisation or allocation outside torch's graph pool inside the call."""
    torch.manual_seed(3)
    dev = torch.device("cuda")
    B, HQ, HKV, D, L, P = 4, 32, 8, 128, 4096, 16
    q = torch.randn(B, HQ, 1, D, device=dev, dtype=torch.bfloat16)
    if paged:
        k = torch.randn(B * L // P, P, HKV, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        table = torch.randperm(B * L // P, device=dev).to(torch.int32).reshape(B, L // P)
        lens = torch.full((B,), L, device=dev, dtype=torch.int32)  # on the device: nothing is read back

        def call():
            return flexjit.paged_flex_attention(q, k, v, table, lens)
    else:
        k = torch.randn(B, HKV, L, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)

        def call():
            return flexjit.flex_attention(q, k, v, enable_gqa=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            call()  # compiles and loads the kernels before capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, call(), atol=0, rtol=0)
