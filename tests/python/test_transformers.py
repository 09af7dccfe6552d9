"""flexjit as a Hugging Face transformers attention backend (flexjit.register_transformers):
small random-weight Llama (GQA), Mistral (sliding window) and Gemma 2 (logit softcapping,
alternating sliding / full layers) models give the logits and greedy tokens of transformers' own
backends, with left padding, right padding and none; masks are flexjit BlockMasks built once per
forward; what cannot be expressed is an error; a training step's loss and gradients match too."""

import pytest
import torch

import flexjit

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(flexjit.library_path() is None, reason="op library not built")

flexjit.register_transformers()


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    return LlamaForCausalLM(cfg), "sdpa"


def mistral():
    from transformers import MistralConfig, MistralForCausalLM
    cfg = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, vocab_size=128, sliding_window=16)
    return MistralForCausalLM(cfg), "sdpa"


def gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM
    cfg = Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=1, head_dim=16, vocab_size=128, sliding_window=16,
                       attn_logit_softcapping=5.0, final_logit_softcapping=30.0, query_pre_attn_scalar=16)
    return Gemma2ForCausalLM(cfg), "eager"  # transformers runs Gemma 2's softcapping on eager only


MODELS = {"llama_gqa3": llama, "mistral_window16": mistral, "gemma2_softcap": gemma2}


def inputs(padding, L=40, batch=3):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (batch, L), generator=g)
    am = torch.ones(batch, L, dtype=torch.long)
    if padding == "left":
        am[0, :7] = 0
        am[2, :1] = 0
    elif padding == "right":
        am[1, -9:] = 0
    return ids, am


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    torch.manual_seed(0)
    m, ref = MODELS[request.param]()
    return request.param, m.eval(), ref


@pytest.mark.parametrize("padding", ["left", "right", "none"])
def test_logits_and_greedy_tokens_match_transformers(model, padding):
    name, m, ref = model
    ids, am = inputs(padding)
    out = {}
    for impl in (ref, "flexjit"):
        m.set_attn_implementation(impl)
        with torch.no_grad():
            logits = m(input_ids=ids, attention_mask=am).logits
            tokens = None
            if padding != "right":  # generation after right padding is not meaningful
                tokens = m.generate(input_ids=ids, attention_mask=am, max_new_tokens=12, do_sample=False,
                                    pad_token_id=0)
        out[impl] = (logits, tokens)
    real = am.bool()
    torch.testing.assert_close(out["flexjit"][0][real], out[ref][0][real], atol=2e-5, rtol=2e-5)
    if padding != "right":
        assert torch.equal(out["flexjit"][1], out[ref][1]), f"{name}: greedy tokens differ from {ref}"


def test_bf16_llama_generates_like_sdpa():
    torch.manual_seed(0)
    m, _ = llama()
    m = m.to(torch.bfloat16).eval()
    ids, am = inputs("left")
    logits = {}
    for impl in ("sdpa", "flexjit"):
        m.set_attn_implementation(impl)
        with torch.no_grad():
            logits[impl] = m(input_ids=ids, attention_mask=am).logits.float()
    real = am.bool()
    torch.testing.assert_close(logits["flexjit"][real], logits["sdpa"][real], atol=3e-2, rtol=3e-2)


def test_one_block_mask_per_forward_shared_by_the_layers(monkeypatch):
    import flexjit.hf as hf
    from transformers.masking_utils import AttentionMaskInterface
    built, used = [], []
    orig_mask, orig_attn = hf.flexjit_mask, hf.flexjit_attention_forward

    def mask_spy(*a, **kw):
        built.append(orig_mask(*a, **kw))
        return built[-1]

    def attn_spy(module, q, k, v, attention_mask, **kw):
        used.append(attention_mask)
        return orig_attn(module, q, k, v, attention_mask, **kw)
    AttentionMaskInterface.register("flexjit", mask_spy)
    transformers.AttentionInterface.register("flexjit", attn_spy)
    try:
        torch.manual_seed(0)
        m, _ = llama()
        m.eval().set_attn_implementation("flexjit")
        ids, am = inputs("left")
        with torch.no_grad():
            m(input_ids=ids, attention_mask=am)
    finally:
        flexjit.register_transformers()
    assert len(built) == 1 and len(used) == 2  # 2 layers, one mask
    assert all(u is built[0] for u in used)


def test_padding_with_holes_reads_a_per_key_buffer_and_stays_exact():
    torch.manual_seed(0)
    m, ref = llama()
    m.eval()
    ids, am = inputs("none")
    am[1, 10:13] = 0  # not one run of ones: handled per key
    out = {}
    for impl in (ref, "flexjit"):
        m.set_attn_implementation(impl)
        with torch.no_grad():
            out[impl] = m(input_ids=ids, attention_mask=am).logits
    torch.testing.assert_close(out["flexjit"][am.bool()], out[ref][am.bool()], atol=2e-5, rtol=2e-5)


def test_what_it_cannot_express_is_an_error():
    import flexjit.hf as hf
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="dense attention mask tensor"):
        hf.flexjit_attention_forward(None, q, q, q, torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="no dropout"):
        hf.flexjit_attention_forward(None, q, q, q, None, dropout=0.1)


def test_paged_cache_decodes_in_place_with_the_same_tokens(monkeypatch):
    import flexjit.hf as hf
    torch.manual_seed(0)
    m, ref = llama()
    m.eval()
    ids, am = inputs("left")
    paged_calls = []
    orig = hf._paged_attention

    def spy(*a, **kw):
        paged_calls.append(a[0].shape)
        return orig(*a, **kw)
    monkeypatch.setattr(hf, "_paged_attention", spy)
    out = {}
    for impl, cache in ((ref, None), ("flexjit", hf.PagedCache(m.config, page_size=16))):
        m.set_attn_implementation(impl)
        with torch.no_grad():
            out[impl] = m.generate(input_ids=ids, attention_mask=am, max_new_tokens=30, do_sample=False,
                                   pad_token_id=0, cache=cache, output_logits=True, return_dict_in_generate=True)
        if cache is not None:
            layer = cache.layers[0]
            assert layer.seq == 40 + 29 and layer.pool_grows <= 3  # grows by doubling, not per step
            assert layer.keys.shape[1:] == (16, 2, 16)               # [pages, page_size, Hkv, D]
    assert len(paged_calls) == 29 * 2  # every decode step of both layers read the pages in place
    assert torch.equal(out["flexjit"].sequences, out[ref].sequences)
    for a, b in zip(out["flexjit"].logits, out[ref].logits):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def test_paged_cache_refuses_sliding_window_models():
    import flexjit.hf as hf
    m, _ = mistral()
    with pytest.raises(ValueError, match="full-attention layers only"):
        hf.PagedCache(m.config)


@pytest.mark.parametrize("name", ["llama_gqa3", "gemma2_softcap"])
def test_training_step_gradients_match_transformers(name):
    # A training step through the backend: the loss and every parameter's gradient as with
    # transformers' own attention (flexjit's backward: tests/python/test_backward.py).
    torch.manual_seed(0)
    m, ref = MODELS[name]()
    m.train()
    m.config.use_cache = False
    ids, am = inputs("left", L=33)
    # Padding rows' outputs differ by backend (flexjit's are 0) and must not reach the loss: no target
    # at a padding position, nor right after one (the causal LM shift reads the row before).
    pad = am == 0
    labels = ids.masked_fill(pad | torch.cat([torch.zeros_like(pad[:, :1]), pad[:, :-1]], 1), -100)
    grads = {}
    for impl in ("flexjit", ref):
        m.set_attn_implementation(impl)
        m.zero_grad()
        loss = m(input_ids=ids, attention_mask=am, labels=labels).loss
        loss.backward()
        grads[impl] = (loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    (loss_a, ga), (loss_b, gb) = grads["flexjit"], grads[ref]
    torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=1e-5)
    assert ga.keys() == gb.keys() and len(ga) > 10
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=2e-5, rtol=2e-3, msg=lambda s, n=n: f"{n}: {s}")
