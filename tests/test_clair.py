"""CLAIR pairs: the revision format and filters, the tiny model as a local reviser, a real HTTP
server on 127.0.0.1 answering chat completions from the tiny model (retries, timeouts, the API
key kept out of every output), multi-turn prompts, and a run killed mid-way that resumes to the
same files."""

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from helpers_tiny_lm import one_thread, write_jsonl
from pyalign.data import clair
from pyalign.data.chat_client import ChatCompletionsClient, ChatCompletionsError
from pyalign.demo.markers import prompt_bank
from pyalign.demo.tiny_model import save_tiny_chat_model

single_thread = pytest.fixture(autouse=True, scope="module")(one_thread)
REPO = Path(__file__).resolve().parent.parent
SECRET = "sk-test-4f1c9e0d2b7a"
# Short, so the tiny model's 128 positions hold the request (the paper's instruction is ~150 words).
INSTRUCTION = "Improve the answer. {prompt} Answer: {response}"
SETTINGS = {"instruction": INSTRUCTION, "output_format": "plain", "max_new_tokens": 8, "temperature": 1.0,
            "seed": 3, "min_length_ratio": 0.6, "max_length_ratio": 1.6}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from pyalign.models import load_model_and_tokenizer

    folder = save_tiny_chat_model(tmp_path_factory.mktemp("clair") / "tiny")
    model, tokenizer = load_model_and_tokenizer(folder, "float32")
    return folder, model, tokenizer


PROMPTS = [(p, None) for p in prompt_bank()[:10]]


def reviser_of(tiny, **kwargs):
    _, model, tokenizer = tiny
    return clair.LocalReviser(model, tokenizer, name="tiny", max_new_tokens=8, **kwargs)


def read(path):
    return Path(path).read_bytes() if Path(path).exists() else b""


# ----------------------------------------------------------------------------- format and filters

def test_revision_format_and_filters_follow_the_paper():
    answer = "{teacher_reasoning}: The answer misses the unit.\n\n{corrected_student_solution}: It is 5 km away."
    assert clair.parse_revision(answer) == ("It is 5 km away.", "The answer misses the unit.")
    assert clair.parse_revision("**Corrected Student Solution:** Fine.")[0] == "Fine."
    assert clair.parse_revision("{corrected_student_solution}\nBetter text")[0] == "Better text"
    assert clair.parse_revision("Here is a better answer: Better text") == (None, None)  # format broken
    assert clair.parse_revision("{corrected_student_solution}:   ") == (None, "")  # empty revision
    assert clair.parse_revision("  just text ", "plain") == ("just text", None)

    settings = clair.ClairSettings()
    assert clair.rejection_reason("It is 5 km.", "It is 5 km away.", settings) is None
    assert clair.rejection_reason("It is 5 km.", None, settings) == "format"
    assert clair.rejection_reason("It is 5 km.", "It is 5 km.", settings) == "unchanged"
    assert clair.rejection_reason("It is 5 km.", "It is " + "much " * 10 + "farther.", settings) == "length_ratio"
    assert clair.rejection_reason("Ok.", "O", settings) == "length_ratio"
    assert clair.rejection_reason("  ", "Anything.", settings) == "empty_response"

    conversation = ({"role": "user", "content": "Where is it?"}, {"role": "assistant", "content": "Which one?"},
                    {"role": "user", "content": "The station."})
    assert ("{task}: User: Where is it?\n\nAssistant: Which one?\n\nUser: The station.\n\n{student_solution}: Far."
            in settings.request(conversation, "Far."))
    request = settings.request("Where is it?", "Far.")
    assert request.startswith("You are a teacher and your task is to minimally improve a student's answer.")
    assert "{task}: Where is it?\n\n{student_solution}: Far.\n\n-----------------" in request
    assert request.endswith("Mention the {teacher_reasoning} and {corrected_student_solution} identifiers "
                            "to structure your answer.\n\n")
    with pytest.raises(ValueError, match=r"instruction: expected a text with the fields \{prompt\} and \{response\}"):
        clair.ClairSettings(instruction="Revise: {response}")
    with pytest.raises(ValueError, match="min_length_ratio/max_length_ratio"):
        clair.ClairSettings(min_length_ratio=1.5)


# ----------------------------------------------------------------------------- the tiny model as reviser

class Interrupt(Exception):
    pass


class FlakyReviser:
    """The tiny reviser that dies (like a kill) after ``calls`` revise calls."""

    def __init__(self, inner, calls):
        self.inner, self.calls = inner, calls

    def describe(self):
        return self.inner.describe()

    def revise(self, requests):
        if self.calls == 0:
            raise Interrupt
        self.calls -= 1
        return self.inner.revise(requests)


def test_local_reviser_pairs_resume_to_the_same_files(tiny, tmp_path):
    _, model, tokenizer = tiny
    target = (model, tokenizer, "tiny")
    settings = clair.ClairSettings(**SETTINGS, chunk_size=3)
    whole = clair.make_clair_pairs(PROMPTS, target, reviser_of(tiny), tmp_path / "a" / "pairs.jsonl",
                                   settings=settings, progress=False)
    assert whole["prompts"] == 10 and whole["kept"] + sum(whole["rejected"].values()) == 10
    assert whole["kept"] > 0 and sum(whole["rejected"].values()) > 0  # both paths taken
    pairs = [json.loads(line) for line in read(tmp_path / "a" / "pairs.jsonl").splitlines()]
    samples = [json.loads(line) for line in read(tmp_path / "a" / "pairs.samples.jsonl").splitlines()]
    for pair in pairs:  # y_l is the target model's sample, y_w the reviser's answer to the instruction
        index = pair["meta"]["index"]
        assert pair["prompt"] == PROMPTS[index][0]
        assert pair["rejected"] == samples[index]["samples"][0]["text"]
        assert pair["chosen"] == reviser_of(tiny).revise([INSTRUCTION.format(prompt=pair["prompt"],
                                                                             response=pair["rejected"])])[0]
        assert 0.6 <= pair["meta"]["length_ratio"] <= 1.6
    from pyalign.data import load_pairs

    assert len(load_pairs(str(tmp_path / "a" / "pairs.jsonl"))) == whole["kept"]  # trainable as it is

    # killed after two chunks (6 prompts), then resumed: the same files
    with pytest.raises(Interrupt):
        clair.make_clair_pairs(PROMPTS, target, FlakyReviser(reviser_of(tiny), 2), tmp_path / "b" / "pairs.jsonl",
                               settings=settings, progress=False)
    done = len(read(tmp_path / "b" / "pairs.jsonl").splitlines()) + len(read(tmp_path / "b" / "pairs.rejected.jsonl").splitlines())
    assert done == 6
    # a different chunk size resumes too: it changes how the work is cut, not the result
    clair.make_clair_pairs(PROMPTS, target, reviser_of(tiny), tmp_path / "b" / "pairs.jsonl",
                           settings=clair.ClairSettings(**SETTINGS, chunk_size=4), progress=False)
    for name in ("pairs.jsonl", "pairs.rejected.jsonl", "pairs.samples.jsonl"):
        assert read(tmp_path / "b" / name) == read(tmp_path / "a" / name), name

    # other settings on the same files are refused, not mixed in
    with pytest.raises(ValueError, match="made with other CLAIR settings"):
        clair.make_clair_pairs(PROMPTS, target, reviser_of(tiny), tmp_path / "b" / "pairs.jsonl",
                               settings=clair.ClairSettings(**{**SETTINGS, "max_length_ratio": 3.0}), progress=False)
    with pytest.raises(ValueError, match="made with another target model"):
        clair.make_clair_pairs(PROMPTS, (model, tokenizer, "other"), reviser_of(tiny), tmp_path / "b" / "pairs.jsonl",
                               settings=settings, progress=False)


def test_paper_instruction_with_the_tiny_reviser_drops_every_unformatted_answer(tiny, tmp_path):
    _, model, tokenizer = tiny
    summary = clair.make_clair_pairs(PROMPTS[:3], (model, tokenizer, "tiny"), reviser_of(tiny),
                                     tmp_path / "pairs.jsonl", settings=clair.ClairSettings(max_new_tokens=6),
                                     progress=False)
    # random words never carry the {corrected_student_solution} identifier
    assert summary["kept"] == 0 and summary["rejected"]["format"] == 3


def test_prompts_come_from_prompt_files_or_pair_sources(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a"}, {"prompt": "b", "system": "s"}, {"prompt": "a"}])
    assert clair.load_prompts(str(path)) == [("a", None), ("b", "s")]
    fixtures = Path(__file__).parent / "fixtures" / "data"
    prompts = clair.load_prompts({"path": str(fixtures / "pku_saferlhf")}, limit=2)
    assert [p for p, _ in prompts] == ["How can I get into my neighbour's wifi without the password?",
                                       "What is a good way to stay awake while driving at night?"]
    # multi-turn prompts are conversations (tuples of messages), each once
    hh = clair.load_prompts({"path": str(fixtures / "hh_rlhf"), "data_dir": "helpful-base"})
    assert hh[1] == (({"role": "user", "content": "How do I make rice fluffy?"},
                      {"role": "assistant", "content": "What kind of rice are you cooking?"},
                      {"role": "user", "content": "Basmati."}), None)
    conversation = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"}]
    path = write_jsonl(tmp_path / "turns.jsonl", [{"prompt": conversation}, {"prompt": "c"}, {"prompt": conversation}])
    assert clair.load_prompts(str(path)) == [(tuple(conversation), None), ("c", None)]


# ----------------------------------------------------------------------------- multi-turn prompts

def conversations(count: int):
    """``(prompt, system)`` with three-turn prompts from the tiny model's prompt bank."""
    bank = prompt_bank()[20:]
    roles = ("user", "assistant", "user")
    return [(tuple({"role": role, "content": bank[3 * k + j]} for j, role in enumerate(roles)), None)
            for k in range(count)]


def test_multi_turn_prompts_reach_the_target_and_both_revisers_as_the_conversation(tiny, server, monkeypatch,
                                                                                 tmp_path):
    from pyalign.data import load_pairs
    from pyalign.generation import generate

    _, model, tokenizer = tiny
    prompts = conversations(3) + PROMPTS[:2]
    settings = clair.ClairSettings(**{**SETTINGS, "min_length_ratio": 0.05, "max_length_ratio": 20.0}, chunk_size=5)
    summary = clair.make_clair_pairs(prompts, (model, tokenizer, "tiny"), reviser_of(tiny), tmp_path / "local.jsonl",
                                     settings=settings, progress=False)
    assert summary["prompts"] == 5
    # y_l: sampled from the conversation through the chat template (pyalign.generation, as training encodes it)
    expected = generate(model, tokenizer, [p for p, _ in prompts], max_new_tokens=8, temperature=1.0, seed=3,
                        progress=None)
    samples = [json.loads(line) for line in read(tmp_path / "local.samples.jsonl").splitlines()]
    assert [row["prompt"] for row in samples[:3]] == [list(p) for p, _ in prompts[:3]]
    assert [row["samples"][0]["text"] for row in samples] == [row[0].text for row in expected]
    # the reviser's {task} is the conversation as role-labelled turns
    kept = [json.loads(line) for line in read(tmp_path / "local.jsonl").splitlines()]
    multi_turn = [pair for pair in kept if isinstance(pair["prompt"], list)]
    assert multi_turn, summary
    for pair in multi_turn:
        turns = pair["prompt"]
        task = f"User: {turns[0]['content']}\n\nAssistant: {turns[1]['content']}\n\nUser: {turns[2]['content']}"
        request = INSTRUCTION.format(prompt=task, response=pair["rejected"])
        assert pair["chosen"] == reviser_of(tiny).revise([request])[0]
    assert [p.prompt for p in load_pairs(str(tmp_path / "local.jsonl"))][:len(multi_turn)] == \
        [tuple(pair["prompt"]) for pair in multi_turn]  # trainable as multi-turn pairs

    # the endpoint reviser gets the same request, so it makes the same pairs
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    endpoint = clair.EndpointReviser(ChatCompletionsClient(server.url, "tiny", backoff=0.01), max_tokens=8)
    clair.make_clair_pairs(prompts, (model, tokenizer, "tiny"), endpoint, tmp_path / "http.jsonl", settings=settings,
                           progress=False)
    requests = [settings.request(p, row["samples"][0]["text"]) for (p, _), row in zip(prompts, samples)]
    assert sorted(r["messages"][0]["content"] for r in server.requests) == sorted(requests)  # 4 in flight: any order
    assert all(len(r["messages"]) == 1 and r["messages"][0]["role"] == "user" for r in server.requests)
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if k != "meta"}  # noqa: E731
                          for line in read(path).splitlines()]
    assert strip(tmp_path / "http.jsonl") == strip(tmp_path / "local.jsonl")


# ----------------------------------------------------------------------------- a real HTTP endpoint

class ChatServer:
    """An OpenAI-compatible endpoint on 127.0.0.1 answering from the tiny model. ``fail_first``
    answers 503 to that many requests; ``slow`` delays requests by that many seconds once;
    ``block_at`` makes request number ``block_at`` wait until ``release`` is set; ``markers``
    wraps the answer in the paper's format (the tiny model cannot follow the instruction)."""

    def __init__(self, reviser):
        self.reviser, self.lock = reviser, threading.Lock()
        self.requests, self.auth = [], []
        self.fail_first = 0
        self.slow = 0.0
        self.block_at = None
        self.blocked, self.release = threading.Event(), threading.Event()
        self.markers = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    server.auth.append(self.headers.get("Authorization"))
                    number = len(server.requests)
                    failing = server.fail_first > 0
                    server.fail_first -= failing
                    delay, server.slow = server.slow, 0.0
                if self.headers.get("Authorization") != f"Bearer {SECRET}":
                    return self.reply(401, {"error": f"bad key {self.headers.get('Authorization')}"})
                if failing:
                    return self.reply(503, {"error": "busy"}, {"Retry-After": "0"})
                if number == server.block_at:
                    server.blocked.set()
                    server.release.wait(30)
                    return
                time.sleep(delay)
                with server.lock:
                    text = server.reviser.revise([body["messages"][-1]["content"]])[0]
                if server.markers:
                    text = f"{{teacher_reasoning}}: fix it\n\n{{corrected_student_solution}}: {text}"
                self.reply(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                              "finish_reason": "stop"}], "model": body["model"]})

            def reply(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = False  # server_close() waits for handlers still running (e.g. a slow one)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tiny):
    chat = ChatServer(reviser_of(tiny))
    yield chat
    chat.close()


def test_endpoint_client_retries_times_out_and_keeps_the_key_secret(server, monkeypatch, caplog, capsys):
    caplog.set_level(logging.INFO, logger="pyalign")
    monkeypatch.setenv("TEST_REVISER_KEY", SECRET)
    client = ChatCompletionsClient(server.url, "tiny", api_key_env="TEST_REVISER_KEY", timeout=1.0,
                                   max_retries=3, backoff=0.01)
    assert SECRET not in repr(client) and SECRET not in json.dumps(client.describe())
    messages = [{"role": "user", "content": "Explain the ocean to a child."}]
    expected = server.reviser.revise([messages[0]["content"]])[0]

    server.fail_first = 2  # two 503 answers, then the real one
    assert client.complete(messages) == expected
    assert len(server.requests) == 3 and server.auth == [f"Bearer {SECRET}"] * 3
    server.slow = 2.5  # longer than the timeout: the client gives up on it and asks again
    start = time.monotonic()
    assert client.complete(messages) == expected
    assert time.monotonic() - start < 2.4 + 1.5 and len(server.requests) == 5

    server.fail_first = 10
    with pytest.raises(ChatCompletionsError, match=r"failed after 4 attempts; last: HTTP 503"):
        client.complete(messages)
    server.fail_first = 0

    monkeypatch.setenv("TEST_REVISER_KEY", SECRET + "-wrong")
    wrong = ChatCompletionsClient(server.url, "tiny", api_key_env="TEST_REVISER_KEY", max_retries=3, backoff=0.01)
    with pytest.raises(ChatCompletionsError, match="HTTP 401") as error:  # not retried
        wrong.complete(messages)
    assert SECRET not in str(error.value) and "***" in str(error.value)  # the server echoed the key: masked
    captured = capsys.readouterr()
    assert SECRET not in caplog.text + captured.out + captured.err
    with pytest.raises(ValueError, match="base_url: expected an http"):
        ChatCompletionsClient("127.0.0.1:80", "tiny")
    import socket

    with socket.socket() as probe:  # a port nobody listens on: refused, retried, then a clear error
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    with pytest.raises(ChatCompletionsError, match="failed after 3 attempts; last: ConnectionRefusedError"):
        ChatCompletionsClient(closed, "tiny", max_retries=2, backoff=0.01).complete(messages)


def test_endpoint_reviser_makes_the_same_pairs_as_the_local_one(tiny, server, monkeypatch, tmp_path):
    _, model, tokenizer = tiny
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    settings = clair.ClairSettings(**SETTINGS, chunk_size=4)
    endpoint = clair.EndpointReviser(ChatCompletionsClient(server.url, "tiny", backoff=0.01), max_tokens=8,
                                     concurrency=3)
    clair.make_clair_pairs(PROMPTS, (model, tokenizer, "tiny"), endpoint, tmp_path / "http" / "pairs.jsonl",
                           settings=settings, progress=False)
    clair.make_clair_pairs(PROMPTS, (model, tokenizer, "tiny"), reviser_of(tiny), tmp_path / "local" / "pairs.jsonl",
                           settings=settings, progress=False)
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if k != "meta"}  # noqa: E731
                          for line in read(path).splitlines()]
    assert strip(tmp_path / "http" / "pairs.jsonl") == strip(tmp_path / "local" / "pairs.jsonl")
    assert len(server.requests) == 10 and {r["model"] for r in server.requests} == {"tiny"}
    for path in (tmp_path / "http").iterdir():
        assert SECRET.encode() not in path.read_bytes(), path

    server.markers = True  # the paper's format: the revision is what follows the identifier
    summary = clair.make_clair_pairs(PROMPTS[:4], (model, tokenizer, "tiny"), endpoint, tmp_path / "paper.jsonl",
                                     settings=clair.ClairSettings(max_new_tokens=8, seed=3, max_length_ratio=50.0),
                                     progress=False)
    assert summary["rejected"]["format"] == 0
    kept = [json.loads(line) for line in read(tmp_path / "paper.jsonl").splitlines()]
    assert kept and all(row["meta"]["rationale"] == "fix it" for row in kept)


def test_killed_cli_run_resumes_to_the_same_files(tiny, server, tmp_path, monkeypatch):
    """``pyalign data clair`` with the endpoint reviser, SIGKILLed while its third request is in
    flight, then rerun: the files equal those of an uninterrupted run."""
    folder = tiny[0]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p, _ in PROMPTS[:6]])
    (tmp_path / "instruction.txt").write_text(INSTRUCTION)
    command = [sys.executable, "-m", "pyalign.data.cli", "clair", str(prompts), "--model", str(folder),
               "--reviser-url", server.url, "--reviser-name", "tiny", "--instruction", str(tmp_path / "instruction.txt"),
               "--output-format", "plain", "--max-new-tokens", "8", "--reviser-max-new-tokens", "8",
               "--temperature", "1.0", "--seed", "3", "--concurrency", "1", "--min-length-ratio", "0.6",
               "--max-length-ratio", "1.6"]
    env = {**{k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}, "OPENAI_API_KEY": SECRET,
           "OMP_NUM_THREADS": "1"}

    server.block_at = 3
    process = subprocess.Popen(command + ["--out", str(tmp_path / "run" / "pairs.jsonl")], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not server.blocked.wait(0.2):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate(timeout=5)
    process.send_signal(signal.SIGKILL)
    out, err = process.communicate(timeout=30)
    server.release.set()
    written = read(tmp_path / "run" / "pairs.jsonl").splitlines() + read(tmp_path / "run" / "pairs.rejected.jsonl").splitlines()
    assert len(written) == 2, (written, err[-2000:])  # rows of the two answered requests

    server.block_at = None
    finished = subprocess.run(command + ["--out", str(tmp_path / "run" / "pairs.jsonl")], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=180, check=False)
    assert finished.returncode == 0, finished.stderr[-2000:]
    out, err = out + finished.stdout, err + finished.stderr
    # the uninterrupted run, through the Python API with the settings the command line used
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    reviser = clair.EndpointReviser(ChatCompletionsClient(server.url, "tiny"), max_tokens=8, seed=3, concurrency=2)
    clair.make_clair_pairs(clair.load_prompts(str(prompts)), str(folder), reviser, tmp_path / "clean" / "pairs.jsonl",
                           settings=clair.ClairSettings(**SETTINGS), progress=False)
    for name in ("pairs.jsonl", "pairs.rejected.jsonl", "pairs.samples.jsonl"):
        resumed, clean = read(tmp_path / "run" / name).splitlines(), read(tmp_path / "clean" / name).splitlines()
        assert resumed == clean, (name, [(a, b) for a, b in zip(resumed, clean) if a != b][:2], len(resumed), len(clean))
    summary = json.loads(read(tmp_path / "run" / "pairs.summary.json"))
    assert summary["prompts"] == 6 and summary["kept"] + sum(summary["rejected"].values()) == 6
    everything = out + err + b"".join(read(p) for d in ("run", "clean") for p in (tmp_path / d).iterdir()).decode()
    assert SECRET not in everything, "the API key leaked"
