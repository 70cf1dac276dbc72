"""pyalign.generation on the tiny chat model: per-row seeding (batch size, order, n, processes),
greedy vs transformers, top-p/top-k, EOS stop, first-token probabilities, resumable JSONL,
errors, conversation (chat-message) prompts; the vLLM backend where vllm is installed."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from helpers_tiny_lm import one_thread

from pyalign import generation
from pyalign.data import encode_prompt
from pyalign.demo.tiny_model import save_tiny_chat_model
from pyalign.generation import Sample, generate, generate_jsonl, sample_tokens
from pyalign.models import load_model_and_tokenizer

single_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

PROMPTS = [
    "Give me a tip about coffee.",
    "Tell me a fact about the moon.",
    "Why do people like chess?",
    "Give me a tip about coffee.",  # a duplicate: must get its own samples
    "Write a short poem about rain and the ocean and the moon.",
    "What is the future of trains?",
]
SYSTEMS = [None, "You are a helpful assistant.", None, None, "Answer briefly.", None]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "model", seed=3)


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    return load_model_and_tokenizer(tiny_folder)


def ids(result):
    return [[s.token_ids for s in row] for row in result]


def test_samples_do_not_depend_on_batch_size_order_or_n(tiny):
    model, tokenizer = tiny
    kwargs = dict(system=SYSTEMS, max_new_tokens=12, progress=None, seed=7)
    reference = generate(model, tokenizer, PROMPTS, n=3, batch_size=18, **kwargs)
    assert len(reference) == len(PROMPTS) and all(len(row) == 3 for row in reference)
    assert all(isinstance(s, Sample) and s.finish_reason in ("eos", "length") for row in reference for s in row)
    for batch_size in (1, 4):
        assert ids(generate(model, tokenizer, PROMPTS, n=3, batch_size=batch_size, **kwargs)) == ids(reference)
    # another order of the list (the duplicate pair keeps its relative order, so each copy keeps
    # its occurrence number)
    order = [5, 4, 2, 1, 0, 3]
    shuffled = generate(model, tokenizer, [PROMPTS[i] for i in order], n=3, batch_size=5,
                        **{**kwargs, "system": [SYSTEMS[i] for i in order]})
    assert [shuffled[order.index(i)] for i in range(6)] == reference
    # sample j does not depend on n
    assert ids(generate(model, tokenizer, PROMPTS, n=2, batch_size=3, **kwargs)) == [r[:2] for r in ids(reference)]
    # n = 1 reads every prompt inside generate; n > 1 reads each distinct prompt once and copies its cache
    assert ids(generate(model, tokenizer, PROMPTS, n=1, batch_size=6, **kwargs)) == [r[:1] for r in ids(reference)]
    # texts are the decoded ids
    assert reference[0][0].text == tokenizer.decode(reference[0][0].token_ids, skip_special_tokens=True).strip()


def test_duplicates_seeds_and_global_rng(tiny):
    model, tokenizer = tiny
    state = torch.get_rng_state()
    first = generate(model, tokenizer, PROMPTS, n=2, max_new_tokens=10, progress=None, seed=1)
    assert torch.equal(torch.get_rng_state(), state), "the global RNG must not be used"
    assert ids(first)[0] != ids(first)[3], "a repeated prompt gets fresh samples"
    assert ids(first)[0][0] != ids(first)[0][1], "samples of one prompt differ"
    assert ids(generate(model, tokenizer, PROMPTS, n=2, max_new_tokens=10, progress=None, seed=2)) != ids(first)
    assert ids(generate(model, tokenizer, PROMPTS, n=2, max_new_tokens=10, progress=None, seed=1)) == ids(first)


def test_greedy_matches_transformers_and_tiny_top_p_is_greedy(tiny):
    import peft

    model, tokenizer = tiny
    greedy = generate(model, tokenizer, PROMPTS[:3], do_sample=False, max_new_tokens=10, batch_size=3, progress=None)
    for prompt, row in zip(PROMPTS[:3], greedy):
        prompt_ids = torch.tensor([encode_prompt(tokenizer, prompt)])
        expected = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False,
                                  max_new_tokens=10, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)[0, prompt_ids.shape[1]:].tolist()
        if tokenizer.eos_token_id in expected:
            expected = expected[:expected.index(tokenizer.eos_token_id)]
        assert row[0].token_ids == expected
    nucleus = generate(model, tokenizer, PROMPTS[:3], top_p=1e-6, max_new_tokens=10, progress=None)
    assert ids(nucleus) == ids(greedy)
    top1 = generate(model, tokenizer, PROMPTS[:3], top_k=1, temperature=3.0, max_new_tokens=10, progress=None)
    assert ids(top1) == ids(greedy)
    # a peft-wrapped model (LoRA B starts at zero: same function) generates the same
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    try:
        again = generate(lora, tokenizer, PROMPTS[:3], do_sample=False, max_new_tokens=10, progress=None)
        twice = generate(lora, tokenizer, PROMPTS[:3], n=2, do_sample=False, max_new_tokens=10, progress=None)
    finally:
        lora.unload()
    assert ids(again) == ids(greedy)
    assert ids(twice) == [row * 2 for row in ids(greedy)]  # through the shared prompt cache


def test_sample_tokens_inverse_cdf_with_top_p_and_top_k():
    probs = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])
    logits = probs.log()
    grid = (torch.arange(10_000, dtype=torch.float64) + 0.5) / 10_000

    def frequencies(**kwargs):
        tokens = sample_tokens(logits.expand(len(grid), -1), grid, **kwargs)
        return torch.bincount(tokens, minlength=5).double() / len(grid)

    assert torch.allclose(frequencies(), probs.double()[0], atol=2e-4)
    # top_p=0.7: sorted 0.4, 0.3 reach 0.7 -> keep {1, 3}; 0.75 needs 0.15 too
    assert torch.allclose(frequencies(top_p=0.7), torch.tensor([0, 4 / 7, 0, 3 / 7, 0], dtype=torch.float64), atol=2e-4)
    assert torch.allclose(frequencies(top_p=0.75),
                          torch.tensor([0, 0.4, 0, 0.3, 0.15], dtype=torch.float64) / 0.85, atol=2e-4)
    assert torch.allclose(frequencies(top_k=2), torch.tensor([0, 4 / 7, 0, 3 / 7, 0], dtype=torch.float64), atol=2e-4)
    # temperature 0.5 squares the probabilities (renormalised)
    assert torch.allclose(frequencies(temperature=0.5), probs.double()[0] ** 2 / (probs.double() ** 2).sum(), atol=2e-4)
    # u just below 1 stays on a kept token
    assert sample_tokens(logits, torch.tensor([1 - 1e-17]), top_p=0.7).item() == 3
    assert sample_tokens(torch.tensor([[0.0, 0.0, float("-inf")]]), torch.tensor([1 - 1e-17])).item() == 1


def test_sample_tokens_nucleus_beyond_the_top_k_candidates():
    # 1000 tokens, nearly flat: the 0.9 nucleus holds ~900 tokens, more than TOP_P_CANDIDATES,
    # in one row; the other row is peaked (its nucleus is within the candidates)
    flat = torch.linspace(0.0, 0.5, 1000)
    peaked = torch.full((1000,), -20.0)
    peaked[[3, 500]] = torch.tensor([2.0, 1.0])
    logits = torch.stack([flat, peaked])
    assert generation.TOP_P_CANDIDATES < 900
    grid = (torch.arange(4000, dtype=torch.float64) + 0.5) / 4000
    tokens = sample_tokens(logits.repeat_interleave(len(grid), 0), grid.repeat(2), top_p=0.9)
    flat_tokens, peaked_tokens = tokens[:len(grid)], tokens[len(grid):]
    probs = flat.softmax(-1)
    order = probs.argsort(descending=True)
    nucleus = order[:int(((probs[order].cumsum(0) - probs[order]) < 0.9).sum())]
    assert set(flat_tokens.tolist()) == set(nucleus.tolist())  # every nucleus token, nothing else
    assert set(peaked_tokens.tolist()) == {3, 500}
    # each row alone gives its tokens of the batched call (decisions are per row)
    assert torch.equal(sample_tokens(logits[1:].expand(len(grid), -1), grid, top_p=0.9), peaked_tokens)


def test_stops_at_eos_and_rows_do_not_affect_each_other(tiny_folder):
    model, tokenizer = load_model_and_tokenizer(tiny_folder)
    eos = tokenizer.eos_token_id
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[eos] = 3.0  # EOS is likely at every step: some rows stop early, some run out
    model.lm_head = head
    result = generate(model, tokenizer, PROMPTS, n=4, max_new_tokens=8, batch_size=24, progress=None)
    samples = [s for row in result for s in row]
    reasons = {s.finish_reason for s in samples}
    assert reasons == {"eos", "length"}
    for s in samples:
        assert eos not in s.token_ids
        assert (len(s.token_ids) == 8) == (s.finish_reason == "length") or s.finish_reason == "eos"
    assert any(s.finish_reason == "eos" and len(s.token_ids) < 8 for s in samples)
    # one row alone (no longer rows around it) gives the same sample
    alone = generate(model, tokenizer, PROMPTS, n=4, max_new_tokens=8, batch_size=1, progress=None)
    assert ids(alone) == ids(result)
    # a custom stop token replaces EOS
    stop = result[0][0].token_ids[2] if len(result[0][0].token_ids) > 2 else None
    if stop is not None:
        custom = generate(model, tokenizer, PROMPTS[:1], n=1, max_new_tokens=8, stop_token_ids=[stop], progress=None)
        assert stop not in custom[0][0].token_ids and custom[0][0].finish_reason == "eos"


def test_first_token_probabilities_are_the_models(tiny):
    model, tokenizer = tiny
    wanted = [5, 9, 11]
    result = generate(model, tokenizer, PROMPTS[:3], system="Answer briefly.", n=2, max_new_tokens=2,
                      first_token_ids=wanted, progress=None)
    for prompt, row in zip(PROMPTS[:3], result):
        prompt_ids = torch.tensor([encode_prompt(tokenizer, prompt, "Answer briefly.")])
        with torch.no_grad():
            expected = model(prompt_ids).logits[0, -1].softmax(-1)[wanted]
        for sample in row:
            assert torch.allclose(torch.tensor(sample.first_token_probs), expected, atol=1e-5)


def test_generate_jsonl_resumes_to_the_uninterrupted_result(tiny, tmp_path):
    model, tokenizer = tiny
    kwargs = dict(system=SYSTEMS, n=2, max_new_tokens=6, seed=3, progress=None)
    full = generate(model, tokenizer, PROMPTS, **kwargs)
    path = tmp_path / "samples.jsonl"
    # a "killed" run: the first 4 rows written (chunks of 2), then a torn line
    first = generate_jsonl(path, model, tokenizer, PROMPTS[:4], chunk_size=2, **{**kwargs, "system": SYSTEMS[:4]})
    assert first == full[:4]
    with path.open("a", encoding="utf-8") as handle:
        handle.write('{"index": 4, "prom')
    resumed = generate_jsonl(path, model, tokenizer, PROMPTS, chunk_size=2, **kwargs)
    assert resumed == full
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(6))
    assert [[Sample(**s) for s in r["samples"]] for r in rows] == full
    # a finished file is read back, not regenerated
    assert generate_jsonl(path, None, tokenizer, PROMPTS, **kwargs) == full
    with pytest.raises(ValueError, match="stale"):
        generate_jsonl(path, model, tokenizer, PROMPTS, **{**kwargs, "seed": 4})
    with pytest.raises(ValueError, match="another call"):
        generate_jsonl(path, model, tokenizer, PROMPTS[:3], **{**kwargs, "system": SYSTEMS[:3]})


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": 0.0}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"), ({"n": 0}, "n"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"batch_size": 0}, "batch_size"),
    ({"system": ["a"]}, "system"), ({"backend": "vllm"}, "backend"), ({"backend": "tgi"}, "backend"),
    ({"stop_token_ids": []}, "stop_token_ids"), ({"first_token_ids": []}, "first_token_ids"),
])
def test_bad_arguments_name_the_field(tiny, kwargs, field):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=f"^{field}"):
        generate(model, tokenizer, PROMPTS[:2], progress=None, **kwargs)


def test_bad_prompts_and_models(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=r"^prompts: .*single string"):
        generate(model, tokenizer, "one prompt", progress=None)
    with pytest.raises(ValueError, match=r"^prompts\[1\]"):
        generate(model, tokenizer, ["ok", 3], progress=None)
    with pytest.raises(ValueError, match="^model: .*load_for_generation"):
        generate("some/folder", tokenizer, ["ok"], progress=None)


# ----------------------------------------------------------------------------- conversations

CONVERSATION = [{"role": "user", "content": "Give me a tip about coffee."},
                {"role": "assistant", "content": "Why do people like chess?"},
                {"role": "user", "content": "Tell me a fact about the moon."}]
ONE_TURN = [{"role": "user", "content": PROMPTS[0]}]  # same tokens as the text PROMPTS[0]


def test_conversation_prompts_are_encoded_as_training_encodes_them(tiny):
    model, tokenizer = tiny
    prompt_ids = encode_prompt(tokenizer, CONVERSATION, "Answer briefly.")
    assert prompt_ids != encode_prompt(tokenizer, CONVERSATION[-1]["content"], "Answer briefly.")
    [[greedy]] = generate(model, tokenizer, [CONVERSATION], system="Answer briefly.", do_sample=False,
                          max_new_tokens=10, progress=None)
    ids_in = torch.tensor([prompt_ids])
    expected = model.generate(ids_in, attention_mask=torch.ones_like(ids_in), do_sample=False, max_new_tokens=10,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    expected = expected[0, len(prompt_ids):].tolist()
    if tokenizer.eos_token_id in expected:
        expected = expected[:expected.index(tokenizer.eos_token_id)]
    assert greedy.token_ids == expected
    # a leading system message is the system prompt, as in the data layer
    with_system = [{"role": "system", "content": "Answer briefly."}] + CONVERSATION
    again = generate(model, tokenizer, [with_system], do_sample=False, max_new_tokens=10, progress=None)
    assert ids(again) == [[expected]]


def test_conversation_seeds_are_stable_and_apart_from_text(tiny):
    model, tokenizer = tiny
    mixed = PROMPTS[:3] + [CONVERSATION, ONE_TURN, tuple(CONVERSATION)]  # a list and a tuple: the same prompt
    kwargs = dict(n=2, max_new_tokens=10, seed=5, progress=None)
    reference = generate(model, tokenizer, mixed, batch_size=12, **kwargs)
    assert ids(generate(model, tokenizer, mixed, batch_size=1, **kwargs)) == ids(reference)
    reversed_ = generate(model, tokenizer, mixed[::-1], batch_size=5, **kwargs)
    assert ids(reversed_[::-1])[:3] == ids(reference)[:3]  # text prompts: untouched by the conversations
    assert ids(reversed_)[0] == ids(reference)[3] and ids(reversed_)[2] == ids(reference)[5]  # occurrences swap
    assert ids(reference)[3] != ids(reference)[5], "a repeated conversation gets fresh samples"
    assert ids(generate(model, tokenizer, [tuple(CONVERSATION)], **kwargs)) == ids(reference)[3:4]
    # the one-turn conversation has the text prompt's tokens but not its seeds
    assert encode_prompt(tokenizer, ONE_TURN) == encode_prompt(tokenizer, PROMPTS[0])
    assert ids(reference)[4] != ids(reference)[0]
    # stable: a pure function of the key (no hash() of Python objects), pinned here
    assert generation.row_seed(0, None, CONVERSATION, 0, 0) == 11949773714166989489
    assert generation.row_seed(0, None, ONE_TURN, 0, 0) != generation.row_seed(0, None, PROMPTS[0], 0, 0)
    assert generation.row_seed(0, None, PROMPTS[0], 0, 0) == 6923263502238232494  # as before conversations existed


def test_generate_jsonl_with_conversations_resumes_and_detects_changes(tiny, tmp_path):
    model, tokenizer = tiny
    prompts = [CONVERSATION, PROMPTS[1], ONE_TURN]
    kwargs = dict(n=2, max_new_tokens=6, seed=3, progress=None)
    path = tmp_path / "samples.jsonl"
    first = generate_jsonl(path, model, tokenizer, prompts[:2], chunk_size=1, **kwargs)
    resumed = generate_jsonl(path, model, tokenizer, prompts, chunk_size=1, **kwargs)
    assert resumed[:2] == first and resumed == generate(model, tokenizer, prompts, **kwargs)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["prompt"] == CONVERSATION and rows[2]["prompt"] == ONE_TURN
    assert generate_jsonl(path, None, tokenizer, [tuple(m) for m in [CONVERSATION]] + prompts[1:], **kwargs) == resumed
    changed = [CONVERSATION[:2] + [{"role": "user", "content": "What is the future of trains?"}]] + prompts[1:]
    with pytest.raises(ValueError, match="row 0 was generated for another prompt"):
        generate_jsonl(path, model, tokenizer, changed, **kwargs)


@pytest.mark.parametrize("prompt, message", [
    ([{"role": "user"}], r"\[0\]\.content must be a string, got NoneType"),
    ([{"content": "Hi"}], r"\[0\]\.role must be one of system, user, assistant, got None"),
    ([{"role": "bot", "content": "Hi"}], r"\[0\]\.role must be one of system, user, assistant, got 'bot'"),
    (CONVERSATION[:2], r"must end with the user's turn, ends with 'assistant'"),
    ([{"role": "system", "content": "s"}], "has no user message"),
    (CONVERSATION[:1] + [{"role": "system", "content": "s"}] + CONVERSATION[2:],
     "a system message is only allowed first"),
    ([], "non-empty list of chat messages"),
    (CONVERSATION[0], r"one message \(a dict\); a conversation is a list of messages"),
    (("Hi",), r"\[0\] must be a message object, got str"),
])
def test_bad_conversations_name_the_prompt_and_the_problem(tiny, tmp_path, prompt, message):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=r"^prompts\[1\]: .*" + message):
        generate(model, tokenizer, [PROMPTS[0], prompt], progress=None)
    with pytest.raises(ValueError, match=r"^prompts\[1\]: .*" + message):
        generate_jsonl(tmp_path / "samples.jsonl", model, tokenizer, [PROMPTS[0], prompt], progress=None)


def test_a_system_message_and_a_system_prompt_together_are_refused(tiny):
    model, tokenizer = tiny
    with_system = [{"role": "system", "content": "Be brief."}] + CONVERSATION
    with pytest.raises(ValueError, match=r"^prompts\[0\]: .*starts with a system message and a separate system "
                                         r"prompt is given too"):
        generate(model, tokenizer, [with_system], system=["Answer briefly."], progress=None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank, world, port, folder, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from pyalign import distributed

    assert distributed.init_from_env("cpu")
    model, tokenizer = load_model_and_tokenizer(folder)
    result = generate(model, tokenizer, PROMPTS, system=SYSTEMS, n=2, max_new_tokens=8, batch_size=3,
                      progress=None, first_token_ids=[5, 6])
    written = generate_jsonl(os.path.join(out_dir, "shared.jsonl"), model, tokenizer, PROMPTS, system=SYSTEMS,
                             n=2, max_new_tokens=8, progress=None, chunk_size=4)
    local_rows = len(distributed.shard(PROMPTS))
    torch.save({"result": result, "written": written, "local_rows": local_rows}, os.path.join(out_dir, f"{rank}.pt"))
    distributed.shutdown()


def test_two_processes_give_the_single_process_result(tiny, tiny_folder, tmp_path):
    model, tokenizer = tiny
    mp.spawn(_rank_worker, args=(2, _free_port(), str(tiny_folder), str(tmp_path)), nprocs=2, join=True)
    single = generate(model, tokenizer, PROMPTS, system=SYSTEMS, n=2, max_new_tokens=8, batch_size=3,
                      progress=None, first_token_ids=[5, 6])
    outputs = [torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(2)]
    assert [o["local_rows"] for o in outputs] == [3, 3]
    for output in outputs:
        assert ids(output["result"]) == ids(single)
        probs = [p for row in output["result"] for s in row for p in s.first_token_probs]
        assert probs == pytest.approx([p for row in single for s in row for p in s.first_token_probs], abs=1e-6)
        assert ids(output["written"]) == ids(single)
    rows = [json.loads(line) for line in (tmp_path / "shared.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(len(PROMPTS)))  # written once, by rank 0


def test_load_for_generation_without_vllm_gives_transformers(tiny_folder):
    model, tokenizer = generation.load_for_generation(tiny_folder, backend="auto" if not _has_vllm() else "hf")
    assert isinstance(model, torch.nn.Module) and not model.training
    with pytest.raises(ValueError, match="^backend"):
        generation.load_for_generation(tiny_folder, backend="gpu")


def _has_vllm() -> bool:
    from pyalign.generation import vllm as generation_vllm

    return generation_vllm.available()


def test_vllm_backend_is_import_guarded():
    from pyalign.generation import vllm as generation_vllm

    if generation_vllm.available():
        pytest.skip("vllm is installed: the import error path is not reachable")
    with pytest.raises(ImportError, match="backend 'vllm'"):
        generation_vllm.load("anything")


@pytest.mark.skipif(not _has_vllm(), reason="vllm is not installed (it cannot be installed on this CPU-only "
                    "machine); this test runs where `import vllm` works, on a CUDA machine")
def test_vllm_backend_same_interface(tiny_folder, tiny):
    llm, tokenizer = generation.load_for_generation(tiny_folder, backend="vllm", gpu_memory_utilization=0.2,
                                                    enforce_eager=True)
    kwargs = dict(system=SYSTEMS, n=3, max_new_tokens=8, seed=5, progress=None)
    first = generate(llm, tokenizer, PROMPTS, **kwargs)
    assert len(first) == len(PROMPTS) and all(len(row) == 3 for row in first)
    assert all(s.finish_reason in ("eos", "length") and tokenizer.eos_token_id not in s.token_ids
               for row in first for s in row)
    assert ids(generate(llm, tokenizer, PROMPTS, **{**kwargs, "batch_size": 1})) == ids(first)
    order = [5, 4, 2, 1, 0, 3]
    shuffled = generate(llm, tokenizer, [PROMPTS[i] for i in order], **{**kwargs, "system": [SYSTEMS[i] for i in order]})
    assert ids([shuffled[order.index(i)] for i in range(6)]) == ids(first)
    # greedy agrees with transformers on the first tokens (fp32 on both engines)
    model, _ = tiny
    greedy_vllm = generate(llm, tokenizer, PROMPTS[:3], do_sample=False, max_new_tokens=4, progress=None)
    greedy_hf = generate(model, tokenizer, PROMPTS[:3], do_sample=False, max_new_tokens=4, progress=None)
    assert ids(greedy_vllm) == ids(greedy_hf)


def test_left_padded_puts_every_row_at_the_right_edge():
    from pyalign.generation import left_padded

    input_ids, attention_mask = left_padded([[5, 6, 7], [8], [9, 10]], pad=0)
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert input_ids.dtype == attention_mask.dtype == torch.long
