"""Tokenizer extension (#20, section 3): tokenizer.add_tokens / add_special_tokens, the embedding
resize (multiple of 64, mean-initialised rows, padding rows out of the loss), LoRA training the new
rows (peft trainable_token_indices), the tokenizer in every checkpoint and artifact, and the
adapter's refusal to load on a base that lacks its tokens. A tiny random Llama on CPU, in process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from ftcluster.corpus.format import tokenizer_fingerprint  # noqa: E402
from ftcluster.errors import TrainError  # noqa: E402
from ftcluster.spec.loader import load_spec_text  # noqa: E402
from ftcluster.train import model as M  # noqa: E402
from ftcluster.train.distributed import DistContext  # noqa: E402
from ftcluster.train.engines import build_engine  # noqa: E402
from ftcluster.train.engines.lora import PlainEngine  # noqa: E402
from ftcluster.train.tokenizer import load_or_train_tokenizer, spec_terms  # noqa: E402

pytestmark = pytest.mark.train

ROOT = Path(__file__).resolve().parents[3]
TEXT = ROOT / "examples" / "data" / "text.jsonl"
CPU = torch.device("cpu")
ONE = DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0, nnodes=1, device=CPU)
TERMS = ["habeas corpus", "res judicata", "Varnholt rule"]


def spec_text(**sections: str) -> str:
    """A LoRA spec of a tiny model on the shipped text set; ``sections`` replace whole top-level keys."""
    parts = {
        "name": "tok",
        "method": "lora",
        "model": "{random_init: {preset: tiny, vocab_size: 320}}",
        "tokenizer": "{train_vocab_size: 320}",
        "data": f"{{train: {TEXT}, format: text, seq_len: 64}}",
        "training": "{max_steps: 4, micro_batch_size: 2, learning_rate: 0.05, warmup_steps: 0, precision: fp32, "
                    "eval_every_steps: null, log_every_steps: 1}",
        "lora": "{r: 4, alpha: 8, dropout: 0.0}",
        "resources": "{gpus_per_node: 0}",
        "output": "{uri: file:///nowhere}",
        **sections,
    }
    return "".join(f"{k}: {v}\n" for k, v in parts.items())


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, cache) -> Path:
    """A saved tiny Llama (320 embeddings, untied) with the BPE it was built for."""
    spec = load_spec_text(spec_text())
    tok = load_or_train_tokenizer(spec, cache / "tokenizers")
    model = M.load_base_model(spec, tok, torch.float32, CPU, cache)
    folder = tmp_path_factory.mktemp("base")
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def wide_tok(tmp_path_factory, base_dir) -> Path:
    """The base's tokenizer with three more tokens than the model has embeddings (a tokenizer.path
    extended by hand: what a user could do before tokenizer.add_tokens existed)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    tok.add_tokens(TERMS)
    folder = tmp_path_factory.mktemp("wide-tok")
    tok.save_pretrained(str(folder))
    return folder


def ids_batch(tok, rows: int = 2) -> dict:
    """Rows of text full of the domain terms."""
    text = (" ".join(f"{t}." for t in TERMS) + " The court applied them. ") * 4
    ids = tok(text, add_special_tokens=False)["input_ids"][:48]
    t = torch.tensor([ids] * rows)
    return {"input_ids": t, "labels": t.clone(), "position_ids": torch.arange(t.shape[1]).expand_as(t).clone(),
            "attention_mask": torch.ones_like(t)}


def effective_rows(model) -> tuple[Any, Any]:
    """(input embedding, output matrix) as the model computes with them, adapters included."""
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    return (merged.get_input_embeddings().weight.detach().clone(),
            merged.get_output_embeddings().weight.detach().clone())


# --------------------------------------------------------------------------- the bug: LoRA left new rows untrained


def test_lora_trains_the_rows_of_tokens_the_base_lacks(base_dir, wide_tok, cache):
    """tokenizer.path holds 3 tokens more than the model: LoRA (all-linear) must train their input and
    output rows, and only theirs. Before #20 they stayed at their initial values: the model could
    never say the new terms."""
    spec = load_spec_text(spec_text(model=f"{{path: {base_dir}}}", tokenizer=f"{{path: {wide_tok}}}"))
    tok = load_or_train_tokenizer(spec, cache / "tokenizers")
    new = [tok.convert_tokens_to_ids(t) for t in TERMS]
    assert min(new) >= 320
    eng, _ = build_engine(spec, {"deepspeed": None}, tok, torch.float32, ONE, cache, 4)
    ref_in, ref_out = effective_rows(M.load_base_model(spec, tok, torch.float32, CPU, cache))
    b = ids_batch(tok)
    n = int((b["labels"][:, 1:] != -100).sum())
    for _ in range(3):
        eng.train_step([b], 1 / n)
    got_in, got_out = effective_rows(eng.module)
    old = torch.arange(320)
    assert torch.equal(got_in[old], ref_in[old]) and torch.equal(got_out[old], ref_out[old])
    for i in new:
        assert not torch.allclose(got_in[i], ref_in[i]), f"input row {i} did not train"
        assert not torch.allclose(got_out[i], ref_out[i]), f"output row {i} did not train"


# --------------------------------------------------------------------------- the tokenizer


def test_added_tokens_and_special_tokens_extend_the_tokenizer_once(cache, caplog):
    spec = load_spec_text(spec_text(tokenizer=textwrap.dedent(f"""\
        {{train_vocab_size: 320, add_tokens: {json.dumps(TERMS + ["habeas corpus", "the"])},
          add_special_tokens: ["<|case|>", "<|eos|>"]}}""")))
    plain = load_or_train_tokenizer(load_spec_text(spec_text()), cache / "tokenizers")
    with caplog.at_level("INFO", logger="ftcluster.train"):
        tok = load_or_train_tokenizer(spec, cache / "tokenizers")
    assert tok.ftcluster_base_vocab == len(plain)
    added = len(tok) - len(plain)
    assert added == 4 + ("the" not in plain.get_vocab())  # the three terms (once), <|case|>, and 'the' if new
    assert "<|eos|>" in caplog.text and "already in the vocabulary" in caplog.text
    for term in TERMS + ["<|case|>"]:
        assert len(tok(term, add_special_tokens=False)["input_ids"]) == 1, term
    assert tok.convert_ids_to_tokens(len(plain)) == "habeas corpus"  # spec order: deterministic ids
    assert "<|case|>" not in tok.decode(tok("a <|case|> b")["input_ids"], skip_special_tokens=True)


def test_fingerprint_changes_with_added_tokens_and_is_the_same_in_another_process(cache, tmp_path):
    plain = load_or_train_tokenizer(load_spec_text(spec_text()), cache / "tokenizers")
    spec = load_spec_text(spec_text(tokenizer=f"{{train_vocab_size: 320, add_tokens: {json.dumps(TERMS)}}}"))
    tok = load_or_train_tokenizer(spec, cache / "tokenizers")
    again = load_or_train_tokenizer(spec, cache / "tokenizers")
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(again) != tokenizer_fingerprint(plain)
    tok.save_pretrained(str(tmp_path))
    code = ("import sys; from transformers import AutoTokenizer; from ftcluster.corpus.format import "
            "tokenizer_fingerprint as f; t = AutoTokenizer.from_pretrained(sys.argv[1]); t.pad_token = t.pad_token "
            "or t.eos_token; print(f(t))")
    other = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                           check=True, env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                                            "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert other.stdout.strip() == tokenizer_fingerprint(tok)


def test_a_terms_file_the_loader_could_not_see_is_read_by_the_runtime_or_refused_in_one_line(tmp_path):
    (tmp_path / "terms.txt").write_text("# terms\nhabeas corpus\n")
    assert spec_terms(type("T", (), {"add_tokens": str(tmp_path / "terms.txt")})()) == ["habeas corpus"]
    with pytest.raises(TrainError, match=r"^tokenizer\.add_tokens: /no/such/terms\.txt: no such file"):
        spec_terms(type("T", (), {"add_tokens": "/no/such/terms.txt"})())


# --------------------------------------------------------------------------- the model's rows


@pytest.mark.parametrize("tied", [False, True])
def test_new_rows_start_at_the_mean_and_padding_rows_stay_out_of_the_loss(cache, tmp_path, tied):
    spec = load_spec_text(spec_text(
        model=f"{{random_init: {{preset: tiny, vocab_size: 320, tie_word_embeddings: {str(tied).lower()}}}}}",
        tokenizer=f"{{train_vocab_size: 320, add_tokens: {json.dumps(TERMS)}}}"))
    tok = load_or_train_tokenizer(spec, cache / "tokenizers")
    plain = M.load_base_model(load_spec_text(spec_text()), load_or_train_tokenizer(
        load_spec_text(spec_text()), cache / "tokenizers"), torch.float32, CPU, cache)
    model: Any = M.load_base_model(spec, tok, torch.float32, CPU, cache)
    plain_: Any = plain
    n, base = len(tok), tok.ftcluster_base_vocab
    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == out.shape[0] == 384 and (emb.shape[0] % 64 == 0) and n < 384
    assert (emb is out) == tied
    known = plain_.get_input_embeddings().weight[:base]
    assert torch.equal(emb[:base], known)  # the old rows are untouched
    want = known.mean(dim=0)
    assert torch.allclose(emb[base:], want.expand(384 - base, -1), atol=0, rtol=0)
    if not tied:
        assert torch.allclose(out[base:], plain_.get_output_embeddings().weight[:base].mean(0).expand(384 - base, -1))
    assert model.ftcluster_new_token_ids == list(range(base, n))
    # Padding rows (ids n..383) get no probability and no gradient: the loss is the real vocabulary's.
    b = ids_batch(tok, rows=1)
    logits = model(input_ids=b["input_ids"]).logits
    assert bool((logits[..., n:] == torch.finfo(logits.dtype).min).all())
    ce = torch.nn.functional.cross_entropy(logits[0, :-1], b["input_ids"][0, 1:])
    real = torch.nn.functional.cross_entropy(logits[0, :-1, :n], b["input_ids"][0, 1:])
    assert float(ce) == pytest.approx(float(real), rel=1e-6)
    ce.backward()
    assert float(out.grad[n:].abs().sum()) == 0 and float(out.grad[base:n].abs().sum()) > 0
    # Saved and used as the next stage's base (a pipeline's LoRA on a continual pre-training's model):
    # the config says where the padding starts, and the padding stays out of the loss there too.
    model.save_pretrained(str(tmp_path))
    tok.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["ftcluster_vocab"] == n
    again = load_spec_text(spec_text(model=f"{{path: {tmp_path}}}", tokenizer="{}"))
    reloaded: Any = M.load_base_model(again, load_or_train_tokenizer(again, cache / "tokenizers"), torch.float32,
                                      CPU, cache)
    assert reloaded.ftcluster_new_token_ids == [] and reloaded.get_input_embeddings().weight.shape[0] == 384
    with torch.no_grad():
        assert bool((reloaded(input_ids=b["input_ids"]).logits[..., n:] == torch.finfo(torch.float32).min).all())


# --------------------------------------------------------------------------- LoRA: what trains, what is saved


def test_lora_trains_only_the_new_rows_and_resumes_them(cache, tmp_path):
    spec = load_spec_text(spec_text(tokenizer=f"{{train_vocab_size: 320, add_tokens: {json.dumps(TERMS)}}}"))
    tok = load_or_train_tokenizer(spec, cache / "tokenizers")
    eng, _ = build_engine(spec, {"deepspeed": None}, tok, torch.float32, ONE, cache, 4)
    trainable = {n: p.shape for n, p in eng.module.named_parameters() if p.requires_grad}
    rows = {n: s for n, s in trainable.items() if "trainable_tokens" in n}
    assert sorted(n.split(".")[-4] for n in rows) == ["embed_tokens", "lm_head"]
    assert all(tuple(s) == (3, 64) for s in rows.values())  # 3 rows each, not 384
    b = ids_batch(tok)
    n = int((b["labels"][:, 1:] != -100).sum())
    eng.train_step([b], 1 / n)
    (tmp_path / "ckpt").mkdir()
    eng.save(tmp_path / "ckpt", rank=0)
    ref = [float(eng.train_step([b], 1 / n)[0]) for _ in range(2)]
    # A resumed run: the base rebuilt from the spec (the same mean rows), the checkpoint loaded.
    other = PlainEngine(M.apply_lora(M.load_base_model(spec, tok, torch.float32, CPU, cache), spec.lora, 0),
                        spec, CPU, torch.float32, 4, 1)
    other.load(tmp_path / "ckpt")
    assert [float(other.train_step([b], 1 / n)[0]) for _ in range(2)] == ref
    eng.export(tmp_path / "adapter", rank=0)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    assert max(s[0] for s in shapes.values()) < 384, shapes  # no whole embedding matrix in the adapter
    assert sum(1 for k in shapes if "trainable_tokens" in k) == 2


@pytest.mark.parametrize("tied,targets", [(True, "all-linear"), (False, "[q_proj, v_proj, lm_head]")])
def test_tied_or_adapted_output_layers_train_the_new_rows_and_the_adapter_gives_the_merged_logits(
        cache, tmp_path, tied, targets):
    """Tied: peft ties the output layer's token rows to the embedding's. lm_head adapted by LoRA: its
    rows learn through that LoRA (peft cannot wrap a LoRA layer in a token adapter)."""
    spec = load_spec_text(spec_text(
        model=f"{{random_init: {{preset: tiny, vocab_size: 320, tie_word_embeddings: {str(tied).lower()}}}}}",
        tokenizer=f"{{train_vocab_size: 320, add_tokens: {json.dumps(TERMS)}}}",
        lora=f"{{r: 4, alpha: 8, dropout: 0.0, target_modules: {targets}}}"))
    tok = load_or_train_tokenizer(spec, cache / "tokenizers")
    eng, _ = build_engine(spec, {"deepspeed": None}, tok, torch.float32, ONE, cache, 4)
    rows = [n for n, p in eng.module.named_parameters() if p.requires_grad and "trainable_tokens" in n]
    assert rows == ["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default"]
    ref_in, ref_out = effective_rows(M.load_base_model(spec, tok, torch.float32, CPU, cache))
    b = ids_batch(tok)
    n = int((b["labels"][:, 1:] != -100).sum())
    for _ in range(3):
        eng.train_step([b], 1 / n)
    eng.export(tmp_path, rank=0)
    eng.module.eval()
    with torch.no_grad():
        want = eng.module(input_ids=b["input_ids"][:1]).logits[..., :len(tok)]
    got_in, got_out = effective_rows(eng.module)
    new = list(range(320, 323))
    assert not torch.allclose(got_in[new], ref_in[new]) and not torch.allclose(got_out[new], ref_out[new])
    assert torch.equal(got_in[:320], ref_in[:320])
    loaded = M.load_adapter(M.load_base_model(spec, tok, torch.float32, CPU, cache), tmp_path, tok).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=b["input_ids"][:1]).logits[..., :len(tok)], want, atol=1e-5)


def test_modules_to_save_trains_the_whole_embedding_instead(cache):
    spec = load_spec_text(spec_text(tokenizer=f"{{train_vocab_size: 320, add_tokens: {json.dumps(TERMS)}}}",
                                    lora="{r: 4, alpha: 8, dropout: 0.0, modules_to_save: [embed_tokens]}"))
    tok = load_or_train_tokenizer(spec, cache / "tokenizers")
    eng, _ = build_engine(spec, {"deepspeed": None}, tok, torch.float32, ONE, cache, 4)
    trainable = {n: tuple(p.shape) for n, p in eng.module.named_parameters() if p.requires_grad}
    assert any("modules_to_save" in n and s == (384, 64) for n, s in trainable.items())
    assert [n for n in trainable if "trainable_tokens" in n] == [
        "base_model.model.lm_head.token_adapter.trainable_tokens_delta.default"]


def test_an_adapter_refuses_a_base_without_its_tokens(cache, tmp_path):
    spec = load_spec_text(spec_text(tokenizer=f"{{train_vocab_size: 320, add_tokens: {json.dumps(TERMS)}}}"))
    tok = load_or_train_tokenizer(spec, cache / "tokenizers")
    eng, _ = build_engine(spec, {"deepspeed": None}, tok, torch.float32, ONE, cache, 4)
    eng.export(tmp_path, rank=0)
    plain_spec = load_spec_text(spec_text())
    small = M.load_base_model(plain_spec, load_or_train_tokenizer(plain_spec, cache / "tokenizers"),
                              torch.float32, CPU, cache)
    with pytest.raises(TrainError, match=r"vocabulary of 32\d tokens, the base model has 320 embeddings "
                                         r"\(missing: habeas corpus, res judicata, Varnholt rule\)"):
        M.load_adapter(small, tmp_path, tok)
    assert M.load_adapter(M.load_base_model(spec, tok, torch.float32, CPU, cache), tmp_path, tok) is not None


# --------------------------------------------------------------------------- a run: checkpoint, adapter, merge


def test_added_tokens_round_trip_through_a_runs_checkpoint_adapter_and_merged_model(cache, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftcluster.plan.launch import compile_plan
    from ftcluster.train import runtime

    out = tmp_path / "out"

    def payload(terms: list[str]) -> dict:
        spec = load_spec_text(spec_text(
            tokenizer=f"{{train_vocab_size: 320, add_tokens: {json.dumps(terms)}, add_special_tokens: ['<|case|>']}}",
            lora="{r: 4, alpha: 8, dropout: 0.0, merge_at_end: true}",
            output=f"{{uri: {out.as_uri()}, checkpoint_every_steps: 2}}"))
        return json.loads(compile_plan(spec).payload_json())

    monkeypatch.setenv("FTCLUSTER_CACHE", str(cache))
    monkeypatch.setenv("FTCLUSTER_LOCAL_DIR", str(tmp_path / "local"))
    assert runtime.run(payload(TERMS)) == 0
    assert runtime.run(payload(TERMS)) == 0  # resumed at the end: the checkpoint's tokenizer is the run's
    from ftcluster.train.tokenizer import TokenizerPart

    assert TokenizerPart.resharding == "global"  # no obstacle to resuming on another number of processes
    # The same number of tokens (the same model shape), another term: the checkpoint's rows mean other words.
    with pytest.raises(TrainError, match=r"trained with another tokenizer \(324 tokens; this run has 324; "
                                         r"differing: Varnholt rule, estoppel\)"):
        runtime.run(payload(TERMS[:2] + ["estoppel"]))

    from ftcluster.storage.layout import step_dir

    ckpt_tok = AutoTokenizer.from_pretrained(str(out / "checkpoints" / step_dir(4) / "tokenizer"))
    adapter_tok = AutoTokenizer.from_pretrained(str(out / "adapter"))
    merged_tok = AutoTokenizer.from_pretrained(str(out / "merged"))
    assert len(ckpt_tok) == len(adapter_tok) == len(merged_tok) == 320 + 4
    for term in TERMS:
        assert len(merged_tok(term, add_special_tokens=False)["input_ids"]) == 1, term
    gen = json.loads((out / "merged" / "generation_config.json").read_text())
    assert gen["suppress_tokens"] == list(range(324, 384))  # generate() never picks a padding row
    meta = json.loads((out / "adapter" / "ftcluster_meta.json").read_text())
    assert meta["tokenizer"]["added"] == TERMS + ["<|case|>"] and meta["tokenizer"]["base_vocab"] == 320
    # The adapter alone on the rebuilt base gives the merged model's logits.
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged")).eval()
    from ftcluster.train.adapters import AdapterSet

    loaded = AdapterSet.load([str(out / "adapter")], device="cpu")  # the base rebuilt and grown, lineage checked
    adapted, tok = loaded.model, loaded.tokenizer
    ids = ids_batch(tok, rows=1)["input_ids"]
    with torch.no_grad():
        a, m = adapted(input_ids=ids).logits[..., :len(tok)], merged(input_ids=ids).logits[..., :len(tok)]
    assert torch.allclose(a, m, atol=1e-4), float((a - m).abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("stage", [3])
def test_a_full_finetune_with_zero3_grows_and_trains_the_new_rows(cache, tmp_path, stage):
    """DeepSpeed ZeRO-3 builds the model partitioned: the rows are grown and set under its gather, the
    final model has 384 rows, the new ones trained away from the mean, the padding ones untouched."""
    import os

    from safetensors import safe_open
    from transformers import AutoTokenizer

    from ftcluster.plan.launch import compile_plan

    out, data = tmp_path / "out", tmp_path / "terms.jsonl"
    data.write_text("".join(json.dumps({"text": f"The court applied {t} to case {i}."}) + "\n"
                            for i in range(40) for t in TERMS))
    spec = load_spec_text(spec_text(
        method="full", lora="null", data=f"{{train: {data}, format: text, seq_len: 64}}", deepspeed=f"{{zero_stage: {stage}}}",
        tokenizer=f"{{train_vocab_size: 320, add_tokens: {json.dumps(TERMS)}}}",
        training="{max_steps: 3, micro_batch_size: 2, learning_rate: 0.01, warmup_steps: 0, precision: fp32, "
                 "eval_every_steps: null, weight_decay: 0.0}",
        output=f"{{uri: {out.as_uri()}}}").replace("lora: null\n", ""))
    (tmp_path / "payload.json").write_text(compile_plan(spec).payload_json())
    env = {**os.environ, "FTCLUSTER_CACHE": str(cache), "FTCLUSTER_LOCAL_DIR": str(tmp_path / "local"),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "ftcluster.train.launch", "--standalone", "--nproc-per-node=1",
                          "--max-restarts=0", "-m", "ftcluster.train", "--spec", str(tmp_path / "payload.json")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    tok = AutoTokenizer.from_pretrained(str(out / "final"))
    assert len(tok) == 323 and len(tok("res judicata", add_special_tokens=False)["input_ids"]) == 1
    with safe_open(str(out / "final" / "model.safetensors"), "pt") as f:
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            w = f.get_tensor(key)
            assert w.shape[0] == 384
            assert torch.equal(w[323:], w[323].expand(61, -1))  # padding rows: one value, never trained
            assert not torch.allclose(w[320:323], w[323].expand(3, -1)), key  # the new rows left the mean


def test_prepare_data_tokenizes_with_the_added_tokens_and_the_run_accepts_its_corpus(cache, tmp_path):
    """prepare-data's tokenizer is the run's, added tokens included, and the fingerprint its manifest
    records is the one training checks (before: prepare-data hashed without the special-tokens map, so
    every corpus it prepared was refused). Another list of terms is refused."""
    from ftcluster.corpus.format import CorpusError
    from ftcluster.train import prepare as P
    from ftcluster.train.stream import check_tokenizer

    def spec(terms: list[str]):
        return load_spec_text(spec_text(
            method="full", lora="null", tokenizer=f"{{train_vocab_size: 320, add_tokens: {json.dumps(terms)}}}",
            data=f"{{train: {tmp_path / 'corpus'}, format: text, seq_len: 64, prepare: {{source: {TEXT}}}}}",
        ).replace("lora: null\n", ""))

    m = P.run_task(spec(TERMS), cache_dir=cache)
    assert m is not None and m.vocab_size == 323
    run_tok = load_or_train_tokenizer(P.prepare_spec(spec(TERMS)), cache / "tokenizers")
    check_tokenizer(m, run_tok, str(tmp_path / "corpus"))
    other = load_or_train_tokenizer(P.prepare_spec(spec(TERMS[:2] + ["estoppel"])), cache / "tokenizers")
    with pytest.raises(CorpusError, match="was prepared with tokenizer"):
        check_tokenizer(m, other, str(tmp_path / "corpus"))


def test_a_model_grown_before_keeps_its_trained_rows_and_only_newer_terms_are_new(cache, tmp_path):
    """A continual pre-training's final model (grown, its new rows trained) as the base of the next
    run with the same terms: its tokenizer holds them already, nothing is reset to the mean; a term
    added on top takes a padding row and is the only new id."""
    from ftcluster.train.tokenizer import load_tokenizer_folder

    spec = load_spec_text(spec_text(tokenizer=f"{{train_vocab_size: 320, add_tokens: {json.dumps(TERMS)}}}"))
    tok = load_or_train_tokenizer(spec, cache / "tokenizers")
    model: Any = M.load_base_model(spec, tok, torch.float32, CPU, cache)
    with torch.no_grad():  # as training would have left them
        model.get_input_embeddings().weight[320:323] = torch.randn(3, 64)
    trained = model.get_input_embeddings().weight[320:323].clone()
    model.save_pretrained(str(tmp_path))
    tok.save_pretrained(str(tmp_path))
    again = load_tokenizer_folder(tmp_path, spec, "test")  # a saved tokenizer that holds the terms already
    assert len(again) == 323 and again.ftcluster_base_vocab == 320

    def next_run(terms: list[str]) -> tuple[Any, Any]:
        s = load_spec_text(spec_text(model=f"{{path: {tmp_path}}}", tokenizer=f"{{add_tokens: {json.dumps(terms)}}}"))
        t = load_or_train_tokenizer(s, cache / "tokenizers")
        return M.load_base_model(s, t, torch.float32, CPU, cache), t

    same, t = next_run(TERMS)
    assert t.ftcluster_base_vocab == 320 and same.ftcluster_new_token_ids == []
    assert torch.equal(same.get_input_embeddings().weight[320:323], trained)
    more, t = next_run(TERMS + ["estoppel"])
    assert more.ftcluster_new_token_ids == [323] and more.get_input_embeddings().weight.shape[0] == 384
    assert torch.equal(more.get_input_embeddings().weight[320:323], trained)
    known = more.get_input_embeddings().weight[:323]  # the model knows the three it was trained on too
    assert torch.allclose(more.get_input_embeddings().weight[323], known.mean(0))


def test_the_fused_loss_is_not_used_on_a_model_with_padding_rows(monkeypatch, caplog):
    """Liger's fused loss never materialises logits, so it cannot mask the rows that only round the
    vocabulary up to 64: such a model trains with the plain loss (the same loss as without padding)."""
    import logging
    from types import SimpleNamespace

    from ftcluster.train import speedups

    monkeypatch.setattr(speedups.decisions, "fused_ce_on", lambda *a: True)
    out = SimpleNamespace(weight=torch.zeros(384, 4))
    model = SimpleNamespace(config=SimpleNamespace(model_type="llama"), ftcluster_vocab=323,
                            get_output_embeddings=lambda: out)
    with caplog.at_level(logging.INFO, logger="ftcluster.train"):
        assert speedups.apply_fused_kernels(model, torch.device("cuda")) is False
    assert "fused linear cross-entropy off: the output layer has 61 padding rows" in caplog.text
