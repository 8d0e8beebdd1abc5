"""The scorer against independent computations: a bigram model worked out by hand, one plain forward pass per
(context, choice), naive greedy decoding; and its invariances (batch size, order, packing, attention kernel)."""

from __future__ import annotations

import copy
import math
import os
import random
from pathlib import Path

import pytest
import torch
from eval_builders import F32_LL, WORDS, bpe_tokenizer, mc_rows, tiny_llama, write_task
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergescale.evaluate import Evaluator, evaluate, load_suite, load_task
from mergescale.evaluate import scoring as S
from mergescale.evaluate.encoding import EncoderSettings, encode_choice_requests
from mergescale.evaluate.generation import generate_greedy


def load(path: Path):
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32
    ).eval(), AutoTokenizer.from_pretrained(path)


def harness_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's split, written out: trailing spaces move, whole[len(encode(context)):]."""
    if context == "":
        cont = tok.encode(continuation, add_special_tokens=False)
        prefix = tok.bos_token_id
        return ([prefix], cont) if cont[0] != prefix else (cont[:1], cont[1:])
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = tok.encode(context)
    return ctx, tok.encode(context + continuation)[len(ctx) :]


@torch.inference_mode()
def naive_loglikelihood(model, ctx: list[int], cont: list[int], max_length: int | None = None) -> float:
    """One plain forward over context + continuation (left-truncated like the harness), no mask, no packing."""
    ids = ctx + cont
    if max_length is not None:
        ids = ids[-(max_length + 1) :]
    inp = torch.tensor([ids[:-1]])
    logp = model(inp).logits[0].float().log_softmax(-1)  # (T, V)
    start = len(ids) - 1 - len(cont)
    return sum(logp[start + t, tok].item() for t, tok in enumerate(cont))


def flat(nested: list[list[float]]) -> list[float]:
    return [x for inner in nested for x in inner]


def sample_mc(tok, rng: random.Random, n: int) -> tuple[list[str], list[list[str]]]:
    rows = mc_rows(rng, n)
    contexts = [r["context"] for r in rows]
    contexts[0] = ""  # empty context: conditioned on the prefix (BOS) token
    contexts[1] = contexts[1] + "  "  # trailing spaces move into the continuation
    return contexts, [[" " + c for c in r["choices"]] for r in rows]


def test_bigram_model_against_a_hand_computation(word_model: Path) -> None:
    """With attention and MLP outputs zeroed, the residual stream is the embedding of the current token, so
    log p(next | prev) = log_softmax(W_head · RMSNorm(E[prev]))[next] — computed here by hand from the weights."""
    model, tok = load(word_model)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    norm_w, eps = model.model.norm.weight, model.config.rms_norm_eps

    def by_hand(prev: int, nxt: int) -> float:
        h = emb[prev].double()
        h = h / torch.sqrt(h.pow(2).mean() + eps) * norm_w.double()
        return torch.log_softmax(head.double() @ h, dim=0)[nxt].item()

    settings = EncoderSettings.for_model(tok, model.config)
    contexts = ["ba be bi", "ko ku", "ma"]
    choices = [[" bo bu", " da"], [" fe fi fo", " ga"], [" ne"]]
    requests = encode_choice_requests(tok, settings, contexts, choices)
    scores = S.score_loglikelihoods(model, requests, batch_size=2)
    for req, got in zip(requests, scores, strict=True):
        for cont, value in zip(req.conts, got, strict=True):
            seq = [*req.ctx, *cont]
            expected = sum(by_hand(seq[i - 1], seq[i]) for i in range(len(req.ctx), len(seq)))
            assert value == pytest.approx(expected, **F32_LL)


def test_loglikelihoods_match_one_plain_forward_per_choice(bpe_model: Path) -> None:
    model, tok = load(bpe_model)
    settings = EncoderSettings.for_model(tok, model.config)
    contexts, conts = sample_mc(tok, random.Random(1), 14)
    requests = encode_choice_requests(tok, settings, contexts, conts)
    assert len(requests) == 14 and requests[0].ctx == (tok.bos_token_id,)
    scores = S.score_loglikelihoods(model, requests, batch_size=8)
    for req, got in zip(requests, scores, strict=True):
        for k, value in zip(req.choice_ids, got, strict=True):
            ctx, cont = harness_pair(tok, contexts[req.owner], conts[req.owner][k])
            assert (list(req.ctx), list(req.conts[req.choice_ids.index(k)])) == (ctx, cont)
            assert value == pytest.approx(naive_loglikelihood(model, ctx, cont), **F32_LL)


def test_batch_size_order_packing_and_attention_kernel_do_not_change_results(
    bpe_model: Path, monkeypatch
) -> None:
    model, tok = load(bpe_model)
    settings = EncoderSettings.for_model(tok, model.config)
    contexts, conts = sample_mc(tok, random.Random(2), 30)
    requests = encode_choice_requests(tok, settings, contexts, conts)
    reference = S.score_loglikelihoods(model, requests, batch_size=1)
    for batch_size in (3, 7, 64):
        got = S.score_loglikelihoods(model, requests, batch_size=batch_size)
        assert flat(got) == pytest.approx(flat(reference), rel=1e-6, abs=1e-5)
    order = list(range(len(requests)))
    random.Random(0).shuffle(order)
    shuffled = S.score_loglikelihoods(model, [requests[i] for i in order], batch_size=5)
    assert flat([shuffled[order.index(i)] for i in range(len(requests))]) == pytest.approx(
        flat(reference), rel=1e-6, abs=1e-5
    )
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"  # additive float mask instead of a boolean one
    assert flat(S.score_loglikelihoods(eager, requests, batch_size=4)) == pytest.approx(
        flat(reference), rel=1e-6, abs=1e-5
    )
    monkeypatch.setattr(S, "can_pack", lambda m: False)  # one row per choice, the harness's layout
    assert flat(S.score_loglikelihoods(model, requests, batch_size=4)) == pytest.approx(
        flat(reference), rel=1e-6, abs=1e-5
    )


def test_packed_rows_and_mask_layout() -> None:
    from mergescale.evaluate.encoding import LoglikelihoodRequest

    req = LoglikelihoodRequest(
        owner=0, ctx=(5, 6, 7), conts=((8, 9), (10,), (11, 12, 13)), choice_ids=(0, 1, 2)
    )
    (row,) = S.build_rows([req], pack=True)
    assert row.tokens == [5, 6, 7, 8, 11, 12]  # each choice without its last token
    assert row.positions == [0, 1, 2, 3, 3, 4]  # every choice continues the context's positions
    assert row.segments == [0, 0, 0, 1, 3, 3]
    assert row.targets == [(0, [2, 3], (8, 9)), (1, [2], (10,)), (2, [2, 4, 5], (11, 12, 13))]
    seg = torch.tensor([row.segments + [-1]])
    mask = S.attention_mask_4d(seg, torch.float32, boolean=True)[0, 0]
    # token 12 (index 5, choice 2) sees the context and its own segment, not choice 0's token 8 (index 3)
    assert mask[5].tolist() == [True, True, True, False, True, True, False]
    assert mask[3].tolist() == [True, True, True, True, False, False, False]
    assert mask[6].tolist() == [True, True, True, False, False, False, True]  # padding sees context only
    assert len(S.build_rows([req], pack=False)) == 3


def test_long_inputs_lose_context_from_the_left_like_the_harness(tmp_path: Path) -> None:
    tok = bpe_tokenizer()
    model = tiny_llama(len(tok), seed=3, max_positions=16, bos=tok.bos_token_id, eos=tok.eos_token_id)
    settings = EncoderSettings.for_model(tok, model.config)
    assert settings.max_length == 16
    rng = random.Random(3)
    contexts = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(6)]
    conts = [
        [" " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))) for _ in range(3)]
        for _ in range(6)
    ]
    requests = encode_choice_requests(tok, settings, contexts, conts)
    assert len(requests) > 6  # choices of different lengths are truncated differently: split into requests
    scores = S.score_loglikelihoods(model, requests, batch_size=4)
    for req, got in zip(requests, scores, strict=True):
        for k, value in zip(req.choice_ids, got, strict=True):
            ctx, cont = harness_pair(tok, contexts[req.owner], conts[req.owner][k])
            assert value == pytest.approx(naive_loglikelihood(model, ctx, cont, max_length=16), **F32_LL)


def test_perplexity_is_token_weighted_nll_of_every_token(suite_dir: Path, word_model: Path) -> None:
    model, tok = load(word_model)
    task = load_task(suite_dir / "ppl" / "task.yaml")
    results = evaluate(model, task, tokenizer=tok, log_samples=True, progress=False, batch_size=3)
    total_nll, total_tokens = 0.0, 0
    for row in task.rows():
        ids = tok.encode(row.text, add_special_tokens=False)
        total_nll -= naive_loglikelihood(model, [tok.bos_token_id], ids)
        total_tokens += len(ids)
    assert results.score("ppl", "loss") == pytest.approx(total_nll / total_tokens, **F32_LL)
    assert results.score("ppl", "ppl") == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-4)
    assert (
        sum(s["tokens"] for s in results.samples) == total_tokens == results.tasks["ppl"].n * 0 + total_tokens
    )


def test_long_texts_are_scored_in_rolling_windows(tmp_path: Path) -> None:
    tok = bpe_tokenizer()
    model = tiny_llama(len(tok), seed=4, max_positions=8, bos=tok.bos_token_id, eos=tok.eos_token_id)
    text = " ".join(WORDS[:12])
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > 16
    from mergescale.evaluate.encoding import encode_rolling_requests

    settings = EncoderSettings.for_model(tok, model.config)
    requests, counts = encode_rolling_requests(tok, settings, [text])
    assert counts == [len(ids)] and sum(len(r.conts[0]) for r in requests) == len(ids)  # every token once
    got = sum(v[0] for v in S.score_loglikelihoods(model, requests, batch_size=2))
    # by hand: window w predicts tokens [8w, 8w+8) from at most the 8 tokens before them (BOS for the first)
    expected = 0.0
    for start in range(0, len(ids), 8):
        pred = ids[start : start + 8]
        ctx = [tok.bos_token_id] if start == 0 else ids[max(0, start - 8) : start]
        inp = (ctx + pred)[-9:]
        expected += naive_loglikelihood(model, inp[: len(inp) - len(pred)], pred)
    assert got == pytest.approx(expected, **F32_LL)


def test_greedy_generation_matches_a_naive_loop_at_any_batch_size(suite_dir: Path, word_model: Path) -> None:
    model, tok = load(word_model)
    task = load_task(suite_dir / "gen" / "task.yaml")
    prompts = [tok.encode(r.prompt) for r in task.rows()]
    settings = EncoderSettings.for_model(tok, model.config)
    kwargs = dict(stop=["."], max_new_tokens=6, max_length=settings.max_length)
    outputs = generate_greedy(model, tok, prompts, batch_size=1, **kwargs)
    assert generate_greedy(model, tok, prompts, batch_size=5, **kwargs) == outputs
    with torch.inference_mode():
        for prompt, out in zip(prompts, outputs, strict=True):
            ids = list(prompt)
            for _ in range(6):
                nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
                ids.append(nxt)
                if nxt == tok.eos_token_id:
                    break
            text = tok.decode(ids[len(prompt) :], skip_special_tokens=True)
            assert out == text.split(".")[0]


def test_evaluate_is_deterministic_and_in_memory_equals_folder(suite_dir: Path, word_model: Path) -> None:
    suite = load_suite(suite_dir)
    from_folder = evaluate(str(word_model), suite, log_samples=True, progress=False, batch_size=4)
    model, tok = load(word_model)
    model.train()  # a training loop may evaluate mid-training: its mode must come back
    in_memory = evaluate(model, suite, tokenizer=tok, log_samples=True, progress=False, batch_size=32)
    assert model.training
    assert from_folder.model.source == "folder" and in_memory.model.source == "memory"
    for name, result in from_folder.tasks.items():
        assert in_memory.tasks[name].metrics == pytest.approx(result.metrics, **F32_LL)
        assert in_memory.tasks[name].n == result.n
    assert [s.get("pred") for s in in_memory.samples] == [s.get("pred") for s in from_folder.samples]
    again = evaluate(model, suite, tokenizer=tok, progress=False, batch_size=32)
    assert again.scores() == in_memory.scores()


def test_tokenised_tasks_are_cached_between_calls(suite_dir: Path, word_model: Path) -> None:
    model, tok = load(word_model)
    task = load_task(suite_dir / "mc_a" / "task.yaml")
    evaluate(model, task, tokenizer=tok, progress=False)
    (encoded,) = task.encoding_cache().values()
    evaluate(model, task, tokenizer=tok, progress=False, batch_size=7)
    assert list(task.encoding_cache().values()) == [encoded]  # same object: nothing tokenised again
    evaluate(model, task, tokenizer=tok, progress=False, limit=5)
    assert len(task.encoding_cache()) == 2
    # one Evaluator resolves the same files to the same (cached) task objects; changed files are reloaded
    evaluator = Evaluator(model, tok)
    first = evaluator.resolve_tasks(suite_dir / "suite.yaml")
    assert first[0] is evaluator.resolve_tasks(suite_dir / "suite.yaml")[0]
    source = first[0].source
    assert source is not None
    source.touch()
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    assert evaluator.resolve_tasks(suite_dir / "suite.yaml")[0] is not first[0]


def test_fewshot_prompts_follow_the_harness_sampler(suite_dir: Path, word_model: Path) -> None:
    from mergescale.evaluate.prompts import build_contexts, fewshot_indices

    task = load_task(suite_dir / "mc_b" / "task.yaml")
    train, test = task.rows("train"), task.rows()
    contexts = build_contexts(task, test, train)
    assert contexts == build_contexts(task, test, train)  # deterministic
    assert build_contexts(task, test[:4], train) == contexts[:4]  # a limit does not change earlier prompts
    rnd = random.Random(
        1234
    )  # the harness: one Random(fewshot seed) per task, rnd.sample(train docs, k) per doc
    for row, context in zip(test[:3], contexts[:3], strict=True):
        picks = rnd.sample(range(len(train)), 2)
        shots = "".join(f"{train[j].context} {train[j].choices[train[j].gold]}\n\n" for j in picks)
        assert context == shots + row.context
    assert fewshot_indices(3, 10, 0, 1) == [[], [], []]


def test_bad_limits_and_choices_that_encode_to_nothing(tmp_path: Path, word_model: Path) -> None:
    from mergescale.errors import ConfigError, TaskError

    rng = random.Random(5)
    rows = mc_rows(rng, 3)
    rows[1]["choices"][0] = (
        "!?"  # word-level vocabulary: punctuation only ... still tokens; use unknown spaces
    )
    rows[2]["choices"][0] = "   "  # whitespace only: no tokens after the split
    path = write_task(tmp_path / "t", {"name": "t"}, {"test": rows})
    with pytest.raises(
        TaskError, match=r"task 't' \(.*test\.jsonl\): example 2: a continuation encodes to no tokens"
    ):
        evaluate(str(word_model), path, progress=False)
    with pytest.raises(ConfigError, match="limit must be at least 1"):
        evaluate(str(word_model), path, progress=False, limit=0)
