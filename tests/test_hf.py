"""Hugging Face models and PEFT adapters under rankfed (issue 17).

Tiny GPT-2s built from a config (nothing downloads). Asserted: a transformers model's own loss
is the loss (labels passed in), padding counts in no loss or accuracy, perplexity = exp(loss);
PEFT's LoRA layers are the LoRA family's factors and uploads hold exactly the trainable adapter
tensors (bytes = their serialised size); the frozen base never changes on the server or the
clients (FedLoRU's base only at merges, identically on both); FedLoRU's PEFT merge keeps the
model's outputs; pFedLoRU's personal adapter never appears in a payload; rankfed's own LoRA
layers compute what PEFT's do; the result saves as PEFT output and loads back the same.
"""

from __future__ import annotations

import copy
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel  # noqa: E402

import rankfed as rf  # noqa: E402
from rankfed.data.base import DataFormatError  # noqa: E402
from rankfed.data.hf import instruction_samples, lm_blocks, read_instructions, read_texts, shakespeare_roles, train_tokenizer, write_jsonl  # noqa: E402
from rankfed.errors import ConfigError  # noqa: E402
from rankfed.local import Task  # noqa: E402
from rankfed.lowrank import apply_lora, lora_layers  # noqa: E402
from rankfed.lowrank.peft_lora import PERSONAL_ADAPTER, merge_adapter, peft_lora_layers  # noqa: E402
from rankfed.wire import encoded_size  # noqa: E402

transformers.utils.logging.set_verbosity_error()
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
VOCAB, T = 40, 12
TARGETS = ["c_attn", "c_proj", "c_fc"]
ROOT = Path(__file__).resolve().parents[1]


def gpt2(vocab: int = VOCAB, **kw) -> GPT2LMHeadModel:
    cfg = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=1, pad_token_id=0, **kw)
    return GPT2LMHeadModel(cfg)


def peft_gpt2(r: int = 4) -> nn.Module:
    return get_peft_model(gpt2(), LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0, fan_in_fan_out=True))


def lm_data(n: int, seed: int, pad_from: int = 9) -> tuple[dict, torch.Tensor]:
    """n right-padded sequences: tokens 2.. with a learnable pattern, padding (id 0) from ``pad_from``."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(2, VOCAB, (n, 1), generator=g)
    ids = (start + torch.arange(T)) % (VOCAB - 2) + 2  # each next token = previous + 1 (mod): learnable
    mask = torch.ones_like(ids)
    mask[:, pad_from:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask}, labels


def federation(algorithm, n_clients: int = 4, model=peft_gpt2, holdout: float = 0.0, seed: int = 0) -> rf.Federation:
    clients = [lm_data(16, seed=i) for i in range(n_clients)]
    local = rf.LocalTraining(optimizer="adamw", lr=1e-2, batch_size=8)
    return rf.Federation(model, clients, test=lm_data(8, seed=99), algorithm=algorithm, local=local, holdout=holdout, seed=seed)


def record_uploads(sim) -> list[tuple[int, int, dict]]:
    seen: list[tuple[int, int, dict]] = []

    def keep(rnd, cid, upload):
        seen.append((rnd, cid, dict(upload)))
        return upload

    sim.tamper = keep
    return seen


# -- the model's own loss ---------------------------------------------------------------------------
def test_a_causal_lms_own_loss_is_the_loss_and_padding_counts_nowhere():
    torch.manual_seed(0)
    model = gpt2().eval()
    x, y = lm_data(6, seed=1)
    task = Task()
    with torch.no_grad():
        own = float(model(**x, labels=y).loss)
        got = task.evaluate(model, [(x, y)])
        assert float(task.batch_loss(model, x, y)) == pytest.approx(own, rel=1e-6)
        # what the model's loss compares: logits [:, :-1] against labels [:, 1:], -100 left out
        logits = model(**x).logits[:, :-1]
        tgt = y[:, 1:]
        valid = tgt != -100
        acc = float(((logits.argmax(-1) == tgt) & valid).sum()) / int(valid.sum())
    assert got["loss"] == pytest.approx(own, rel=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(own), rel=1e-6)
    assert got["accuracy"] == pytest.approx(acc)
    # other tokens at the padded positions (masked, labelled -100) change nothing
    x2 = {k: v.clone() for k, v in x.items()}
    x2["input_ids"][x["attention_mask"] == 0] = 7
    assert task.evaluate(model, [(x2, y)]) == pytest.approx(got)
    # split into batches, the mean is over tokens, not batches
    halves = [({k: v[:2] for k, v in x.items()}, y[:2]), ({k: v[2:] for k, v in x.items()}, y[2:])]
    assert task.evaluate(model, halves)["loss"] == pytest.approx(own, rel=1e-5)


def test_a_sequence_classifier_trains_with_its_own_loss_and_reports_accuracy():
    def classifier():
        cfg = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=1, n_head=2, num_labels=3, pad_token_id=0)
        return GPT2ForSequenceClassification(cfg)

    def data(n, seed):
        x, _ = lm_data(n, seed)
        return x, (x["input_ids"][:, 0] % 3)

    fed = rf.Federation(classifier, [data(12, i) for i in range(3)], test=data(10, 9), algorithm=rf.FedAvg(), local=rf.LocalTraining(optimizer="adamw", lr=1e-2, batch_size=4))
    result = fed.run(rounds=2)
    last = result.history[-1]
    assert last["accuracy"] is not None and 0.0 <= last["accuracy"] <= 1.0
    assert "perplexity" not in last  # not a language model
    assert result.summary["loss"] == "model (labels=)"
    model = result.model.eval()
    x, y = data(10, 9)
    with torch.no_grad():
        assert last["loss"] == pytest.approx(float(model(**x, labels=y).loss), rel=1e-5)


def test_a_hugging_face_model_with_a_tensor_batch_is_a_clear_error():
    fed = rf.Federation(gpt2, [(torch.zeros(4, T, dtype=torch.long), torch.zeros(4, T, dtype=torch.long))], algorithm=rf.FedAvg())
    with pytest.raises(ValueError, match="dict batch"):
        fed.run(rounds=1)


# -- PEFT adapters as the factors ------------------------------------------------------------------------
def _adapter_names(model: nn.Module, only_trainable: bool = True) -> set[str]:
    return {n for n, p in model.named_parameters() if "lora_" in n and (p.requires_grad or not only_trainable)}


@pytest.mark.parametrize("algo", [rf.FedLoRA(), rf.FedLoRU(tau=2), rf.FALoRA(), rf.MAPA(k=64)], ids=lambda a: a.name)
def test_uploads_are_exactly_the_adapter_tensors_and_the_base_never_moves(algo):
    fed = federation(algo)
    sim = fed.simulator(rounds=3, clients_per_round=2, client_kind="stateless")
    uploads = record_uploads(sim)
    init = {k: v.clone() for k, v in fed.initial_model().state_dict().items()}
    records = [sim.run_round(r) for r in (1, 2, 3)]
    client_model = getattr(sim.client, "model", sim.worker)  # MAPA trains the worker module
    trainable = _adapter_names(client_model)
    if algo.name == "fa_lora":
        assert trainable == {n for n in _adapter_names(fed.initial_model(), False) if "lora_B" in n}
    else:
        assert trainable == _adapter_names(fed.initial_model())
    per_client = [b for rec in records for b in rec.uplink_bytes_per_client]
    assert per_client == [encoded_size(u) for _, _, u in uploads]  # bytes = the serialised upload
    for _, _, up in uploads:
        tensors = {k: v for k, v in up.items() if not k.startswith("@")}
        if algo.name == "mapa":  # only k numbers travel
            assert sum(v.numel() for v in tensors.values()) == 64
        else:
            assert set(tensors) == trainable
            sizes = sum(v.numel() * v.element_size() for v in tensors.values())
            assert sizes == sum(p.numel() * 4 for n, p in client_model.named_parameters() if n in trainable)
    # nothing outside the adapters moved: on the client half every client trains with, and globally
    for state in (client_model.state_dict(), sim.server.global_model_state()):
        for name, value in state.items():
            if "lora_" in name or name not in init:
                continue
            if algo.name == "fedloru" and "base_layer" in name:
                continue  # FedLoRU's merges move the base: checked in the next test
            assert torch.equal(value.cpu(), init[name]), name
    if algo.name == "fa_lora":  # A stays at its draw
        for name, value in sim.server.global_model_state().items():
            if "lora_A" in name:
                assert torch.equal(value, init[name]), name


def test_fedloru_on_peft_merges_the_servers_and_the_clients_base_alike():
    fed = federation(rf.FedLoRU(tau=2))
    sim = fed.simulator(rounds=4, clients_per_round=2, client_kind="stateful")
    init = fed.initial_model().state_dict()
    for r in range(1, 5):
        sim.run_round(r)
    sim.client.sync(sim.server.broadcast(5), sim.replica)  # round 4's merge reaches the clients with the next broadcast
    server = sim.server.global_model_state()
    bases = [k for k in server if k.endswith("base_layer.weight")]
    assert bases and all(not torch.equal(server[k], init[k]) for k in bases)  # merged twice
    for k in sim.replica:  # the stateful clients' replica merged the same way, from the same numbers
        assert torch.allclose(sim.replica[k], server[k], atol=1e-6), k
    # client state is adapters only: a stateful run keeps no per-client copy of the model
    assert all(not state for state in sim.client_states.values())


def test_a_peft_merge_keeps_the_models_outputs():
    torch.manual_seed(0)
    model = peft_gpt2().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)  # a trained, non-zero adapter
    x, _ = lm_data(4, seed=3)
    with torch.no_grad():
        before = model(**x).logits
        base_before = {n: l.get_base_layer().weight.clone() for n, l in peft_lora_layers(model).items()}
        merge_adapter(model, "default", "random", torch.Generator().manual_seed(1))
        after = model(**x).logits
    assert torch.allclose(before, after, atol=1e-5, rtol=1e-5)
    for n, layer in peft_lora_layers(model).items():
        assert not torch.equal(layer.get_base_layer().weight, base_before[n])
        assert not layer.merged_adapters  # the merge is permanent: the adapter path is live again
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0  # fresh pair: up zero


def test_pfedloru_personal_adapters_never_appear_in_a_payload():
    fed = federation(rf.PFedLoRU(tau=2, personal_rank=2), holdout=0.25)
    sim = fed.simulator(rounds=3, clients_per_round=2, client_kind="stateful")
    uploads = record_uploads(sim)
    downs = []
    real_configure, real_broadcast = sim.server.configure, sim.server.broadcast
    sim.server.configure = lambda rnd, ids: downs.append(out := real_configure(rnd, ids)) or out
    sim.server.broadcast = lambda rnd: downs.append(out := real_broadcast(rnd)) or out
    records = [sim.run_round(r) for r in (1, 2, 3)]
    assert uploads and downs
    for payload in [u for _, _, u in uploads] + [p for d in downs for p in (d.values() if isinstance(d, dict) and all(isinstance(k, int) for k in d) else [d])]:
        assert not [k for k in payload if PERSONAL_ADAPTER in k]
    # the personal adapters live in the clients' own state, one per client that trained, and differ
    personal = {cid: s["personal"] for cid, s in sim.client_states.items()}
    assert len(personal) >= 2 and all(all(PERSONAL_ADAPTER in k for k in p) for p in personal.values())
    a, b = list(personal.values())[:2]
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert records[-1].personal_accuracy is not None


def test_options_of_rankfeds_own_layers_that_contradict_the_lora_config_are_errors():
    with pytest.raises(ConfigError, match=r"algorithm.rank = 16.*r = 4"):
        federation(rf.FedLoRU(rank=16)).simulator(rounds=1)
    federation(rf.FedLoRU(rank=4)).simulator(rounds=1)  # the same rank is fine
    with pytest.raises(ConfigError, match="pfedlora"):
        federation(rf.PFedLoRA()).simulator(rounds=1)


# -- rankfed's own layers are PEFT's maths ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_rankfeds_lora_layers_compute_what_peft_layers_do(kind):
    torch.manual_seed(0)
    layer = nn.Linear(7, 5) if kind == "linear" else nn.Conv2d(3, 6, 3, stride=2, padding=1)
    x = torch.randn(4, 7) if kind == "linear" else torch.randn(2, 3, 9, 9)
    ours, theirs = nn.Sequential(copy.deepcopy(layer)), nn.Sequential(copy.deepcopy(layer))
    apply_lora(ours, 3, 6.0, patterns=["0"], exclude=[])
    theirs = get_peft_model(theirs, LoraConfig(r=3, lora_alpha=6, target_modules=["0"], lora_dropout=0.0))
    mine = next(iter(lora_layers(ours).values()))
    peft_layer = next(iter(peft_lora_layers(theirs).values()))
    with torch.no_grad():
        mine.up.weight.normal_()
        peft_layer.lora_A["default"].weight.copy_(mine.down.weight)
        peft_layer.lora_B["default"].weight.copy_(mine.up.weight)
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)
        assert torch.allclose(mine.delta_weight(), peft_layer.get_delta_weight("default"), atol=1e-6)


# -- PEFT output ----------------------------------------------------------------------------------------
def _play(path: Path, roles: int = 6, lines: int = 30) -> Path:
    words = "the king doth speak of love and war my lord good night sweet prince".split()
    g = torch.Generator().manual_seed(0)
    blocks = []
    for i in range(lines * roles):
        role = f"ROLE {i % roles if i % 3 else 0}"  # ROLE 0 speaks most
        line = " ".join(words[int(j)] for j in torch.randint(0, len(words), (8,), generator=g))
        blocks.append(f"{role}:\n{line}.\n")
    path.write_text("\n".join(blocks))
    return path


def test_the_example_fine_tunes_with_fedloru_and_saves_peft_output_that_loads_back(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import hf_lora
    finally:
        sys.path.remove(str(ROOT / "examples"))
    text = _play(tmp_path / "play.txt")
    out = tmp_path / "run"
    summary = hf_lora.main(["--text", str(text), "--out", str(out), "--clients", "4", "--rounds", "3", "--tau", "2", "--vocab", "300",
                            "--n-embd", "16", "--n-layer", "1", "--n-head", "2", "--block", "16", "--pretrain-steps", "5", "--max-blocks", "6"])
    run = summary["runs"]["fedloru"]
    assert summary["reload_max_abs_diff"] <= 1e-5
    assert (out / "peft/adapter/adapter_config.json").is_file() and (out / "peft/adapter/adapter_model.safetensors").is_file()
    assert math.isfinite(run["final_test_loss"]) and run["final_perplexity"] == pytest.approx(math.exp(run["final_test_loss"]))
    # the reloaded model is a PeftModel whose merge_and_unload is a plain GPT-2 with the same outputs
    reloaded = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(out / "peft/base"), out / "peft/adapter").eval()
    ids = torch.randint(2, 300, (2, 10))
    with torch.no_grad():
        plain = copy.deepcopy(reloaded).merge_and_unload()
        assert type(plain) is GPT2LMHeadModel
        assert torch.allclose(plain(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-5)


# -- data and tokenizers without a download ----------------------------------------------------------------
def test_roles_blocks_and_a_trained_bpe_tokenizer(tmp_path):
    roles = shakespeare_roles(_play(tmp_path / "play.txt"))
    assert list(roles)[0] == "ROLE 0" and set(roles) == {"ROLE 0", "ROLE 1", "ROLE 2", "ROLE 4", "ROLE 5"}  # largest first
    tok = train_tokenizer(roles.values(), "bpe", 300)
    text = roles["ROLE 1"]
    assert tok.decode(tok(text)["input_ids"]) == text
    x, y = lm_blocks(text, tok, block=16)
    n_tokens = len(tok(text)["input_ids"])
    assert int(x["attention_mask"].sum()) == int((y != -100).sum()) <= n_tokens
    assert torch.equal(y[x["attention_mask"] == 1], x["input_ids"][x["attention_mask"] == 1])
    assert bool((x["input_ids"][x["attention_mask"] == 0] == tok.pad_token_id).all())
    char = train_tokenizer(["ab c\nd"], "char")
    assert char.decode(char("cab\nd")["input_ids"]) == "cab\nd"
    assert char.pad_token_id == 0 and char.eos_token_id == 1


def test_alpaca_style_jsonl_is_read_and_only_the_response_is_learned(tmp_path):
    path = write_jsonl([{"instruction": "Add the numbers", "input": "1 2", "output": "3"}, {"instruction": "Say hello", "output": "hello"}], tmp_path / "alpaca.jsonl")
    records = read_instructions(path)
    assert records[1] == {"instruction": "Say hello", "input": "", "output": "hello"}
    tok = train_tokenizer(["Below is an instruction that describes a task. ### Response: hello 3 1 2 Add the numbers Say"], "char")
    x, y = instruction_samples(records, tok, max_length=400)
    for i, rec in enumerate(records):
        learned = y[i][y[i] != -100]
        assert tok.decode(learned) == rec["output"] + tok.eos_token
    assert read_texts(path, field="output") == ["3", "hello"]
    bad = write_jsonl([{"instruction": "x", "output": "y"}, {"instruction": "no output"}], tmp_path / "bad.jsonl")
    with pytest.raises(DataFormatError, match=r"bad.jsonl: record 2 has no 'output'"):
        read_instructions(bad)
    (tmp_path / "lines.txt").write_text("one\n\ntwo\n")
    assert read_texts(tmp_path / "lines.txt") == ["one", "two"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        instruction_samples(records, tok, max_length=20)
    assert any("cuts off the whole response" in str(w.message) for w in caught)


def test_a_lora_config_puts_the_same_peft_adapters_on_every_partys_model():
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, lora_dropout=0.0, fan_in_fan_out=True)
    clients = [lm_data(8, seed=i) for i in range(2)]
    fed = rf.Federation(gpt2, clients, test=lm_data(4, seed=9), algorithm=rf.FedLoRA(), adapters=lora, local=rf.LocalTraining(optimizer="adamw", lr=1e-2, batch_size=4))
    a, b = fed.initial_model(), fed.initial_model()
    assert isinstance(a, PeftModel) and _adapter_names(a)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))  # seeded: every party alike
    result = fed.run(rounds=1)
    assert isinstance(result.model, PeftModel)
    assert result.summary["trainable_parameters"] == sum(p.numel() for n, p in a.named_parameters() if "lora_" in n)
    assert "peft LoRA r=2" in result.summary["adapters"]
    with pytest.raises(ConfigError, match="adapters"):
        rf.Federation(gpt2, clients, adapters={"r": 2})


LM_USER_CODE = '''
import torch
from transformers import GPT2Config, GPT2LMHeadModel


def gpt2(n_embd=16):
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=32, n_embd=n_embd, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=1))


def blocks(num_clients=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    def one(n):
        ids = torch.randint(2, 40, (n, 12), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids
    return [one(8) for _ in range(num_clients)], one(6)
'''


def test_an_experiment_file_puts_peft_adapters_on_a_model_of_your_own(tmp_path):
    from rankfed.app.config import parse_config
    from rankfed.app.experiment import run_experiment

    (tmp_path / "lmcode.py").write_text(LM_USER_CODE)
    doc = {
        "task": {"model": "lmcode:gpt2", "dataset": "lmcode:blocks", "holdout": 0.0, "python_path": [str(tmp_path)],
                 "adapters": {"r": 2, "lora_alpha": 4, "target_modules": ["c_attn"], "lora_dropout": 0.0, "fan_in_fan_out": True}},
        "federation": {"clients": 3, "rounds": 2, "participation": 1.0},
        "client": {"optimizer": "adamw", "lr": 1e-2, "batch_size": 4},
        "algorithm": {"name": "fedloru", "tau": 1},
    }
    summary = run_experiment(parse_config(doc), tmp_path / "run")
    assert summary["adapters"].startswith("peft LoRA r=2") and summary["loss"] == "model (labels=)"
    assert summary["trainable_parameters"] == 2 * 16 + 48 * 2  # the one layer's c_attn (16 -> 48): A (2 x 16) + B (48 x 2)
    bad = {**doc, "task": {**doc["task"], "adapters": {"r": 2, "rank": 3}}}
    with pytest.raises(ConfigError, match=r"task.adapters.rank"):
        run_experiment(parse_config(bad), tmp_path / "bad")
