"""Training: losses fall, MRL beats truncation at low dims, checkpoints resume to the same state,
and the CLI trains text (token bag, transformer) and image (WebDataset, Parquet) models whose
exports load through ``get_encoder``; one short Ray Train run."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn

from mrl_core.encoders import get_encoder
from mrl_core.evaluate import linear_probe_accuracy
from mrl_core.sources import read_table
from mrl_core.training import (
    AdaptorJob,
    ClassifierJob,
    ClassifierObjective,
    FitConfig,
    ImageDataset,
    NestedClassifier,
    Runner,
    build_classifier,
    export_classifier,
    fit,
    image_transform,
    latest_checkpoint,
    predict,
    prepare_adaptor_data,
)
from mrl_core.training.data import expand_shards, scan_shards

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipelines.train import build_parser, main  # noqa: E402

QUIET = Runner()
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# a synthetic vector task and a linear encoder


class Linear(nn.Module):
    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim_in, dim_out)
        self.out_dim = dim_out

    def forward(self, batch):
        return self.lin(batch["x"])


class Rows(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def collate(rows):
    return {"x": torch.stack([r[0] for r in rows]), "labels": torch.stack([r[1] for r in rows])}


def gaussian_task(n=1200, dim=32, classes=8, seed=0):
    """Classes separated along 4 input directions; the other 28 carry louder noise, so a random
    2-dim projection sees little of the signal while a learnt one sees most of it."""
    rng = np.random.default_rng(seed)
    means = np.zeros((classes, dim))
    means[:, :4] = rng.standard_normal((classes, 4)) * 2.0
    y = rng.integers(0, classes, n)
    noise = rng.standard_normal((n, dim)) * np.r_[np.full(4, 0.5), np.full(dim - 4, 2.0)]
    return (means[y] + noise).astype(np.float32), y


def classifier(dims, dim=32, classes=8, seed=0):
    torch.manual_seed(seed)
    return NestedClassifier(Linear(dim, dim), dims, classes)


def test_losses_decrease_on_a_toy_problem(tmp_path):
    x, y = gaussian_task(n=800)
    model = classifier([4, 8, 32], classes=8)
    cfg = FitConfig(epochs=3, batch_size=64, lr=1e-2, log_every=0)
    hist = fit(ClassifierObjective(model), Rows(x, y), collate, cfg, tmp_path, QUIET)
    first, last = hist[0]["loss_per_dim"], hist[-1]["loss_per_dim"]
    assert all(last[m] < first[m] for m in first), (first, last)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l_)["epoch"] for l_ in lines] == [1, 2, 3]
    assert set(json.loads(lines[0])["loss_per_dim"]) == {"4", "8", "32"}


def test_mrl_beats_truncation_of_an_untrained_order_at_low_dims(tmp_path):
    x, y = gaussian_task()
    xtr, ytr, xte, yte = x[:1000], y[:1000], x[1000:], y[1000:]
    cfg = FitConfig(epochs=8, batch_size=50, lr=1e-2, log_every=0)
    mrl = classifier([2, 4, 8, 16, 32])
    fit(ClassifierObjective(mrl), Rows(xtr, ytr), collate, cfg, tmp_path / "mrl", QUIET)
    plain = classifier([32])
    fit(ClassifierObjective(plain), Rows(xtr, ytr), collate, cfg, tmp_path / "ff", QUIET)
    _, mrl_logits, _ = predict(mrl, Rows(xte, yte), collate)
    z_tr, _, _ = predict(plain, Rows(xtr, ytr), collate)
    z_te, plain_logits, _ = predict(plain, Rows(xte, yte), collate)
    full_plain = np.mean(plain_logits[0].argmax(1) == yte)
    for i, m in enumerate([2, 4]):
        mrl_acc = np.mean(mrl_logits[i].argmax(1) == yte)
        trunc_acc = linear_probe_accuracy(z_tr[:, :m], ytr, z_te[:, :m], yte)
        assert mrl_acc > trunc_acc + 0.1, (m, mrl_acc, trunc_acc)
    # and at the full dim MRL costs little
    assert np.mean(mrl_logits[-1].argmax(1) == yte) > full_plain - 0.05


class Interrupt(Exception):
    pass


def test_checkpoints_resume_to_the_same_state(tmp_path, caplog):
    x, y = gaussian_task(n=600)
    cfg = FitConfig(epochs=3, batch_size=64, lr=1e-2, log_every=0, seed=7)

    straight = classifier([4, 32], seed=1)
    fit(ClassifierObjective(straight), Rows(x, y), collate, cfg, tmp_path / "a", QUIET)

    def stop_after_first(metrics, path):
        if metrics["epoch"] == 1:
            raise Interrupt

    interrupted = classifier([4, 32], seed=1)
    runner = Runner(report=stop_after_first)
    with pytest.raises(Interrupt):
        fit(ClassifierObjective(interrupted), Rows(x, y), collate, cfg, tmp_path / "b", runner)
    assert latest_checkpoint(tmp_path / "b").name == "epoch-0001"

    resumed = classifier([4, 32], seed=99)  # a fresh model: everything comes from the checkpoint
    with caplog.at_level(logging.INFO, logger="mrl_core.training"):
        hist = fit(ClassifierObjective(resumed), Rows(x, y), collate, cfg, tmp_path / "b", QUIET)
    logs = [r.getMessage() for r in caplog.records]
    assert any("resumed" in m for m in logs)
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    assert latest_checkpoint(tmp_path / "b").name == "epoch-0003"


def test_resume_refuses_a_checkpoint_from_other_settings(tmp_path):
    x, y = gaussian_task(n=256)
    cfg = FitConfig(epochs=1, batch_size=64, lr=1e-2, log_every=0)
    fit(ClassifierObjective(classifier([4, 32])), Rows(x, y), collate, cfg, tmp_path, QUIET)

    other_lr = FitConfig(**{**cfg.__dict__, "lr": 2e-2})
    with pytest.raises(ValueError, match=r"lr: checkpoint 0\.01, given 0\.02") as err:
        fit(ClassifierObjective(classifier([4, 32])), Rows(x, y), collate, other_lr, tmp_path,
            QUIET)
    assert "another --out" in str(err.value) and str(tmp_path / "checkpoints") in str(err.value)
    with pytest.raises(ValueError, match=r"nesting_dims: checkpoint \[4, 32\], given \[8, 32\]"):
        fit(ClassifierObjective(classifier([8, 32])), Rows(x, y), collate, cfg, tmp_path, QUIET)
    with pytest.raises(ValueError, match=r"dim_loss_weights.*; objective"):
        fit(ClassifierObjective(classifier([4, 32]), weights=[2.0, 1.0]), Rows(x, y), collate,
            cfg, tmp_path, QUIET, settings={"objective": "changed"})

    # more epochs, other logging: the same run, continued
    longer = FitConfig(**{**cfg.__dict__, "epochs": 2, "log_every": 5, "keep_checkpoints": 0})
    hist = fit(ClassifierObjective(classifier([4, 32])), Rows(x, y), collate, longer, tmp_path,
               QUIET)
    assert [h["epoch"] for h in hist] == [1, 2]


# ---------------------------------------------------------------------------------------------
# text through the CLI


def text_task(path: Path, n: int = 400, seed: int = 0) -> Path:
    """Four topics: a text is 6 words from its topic's 10 plus 4 from 20 shared ones."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    texts = [
        " ".join(f"w{w}" for w in np.r_[rng.integers(10 * c, 10 * c + 10, 6), rng.integers(40, 60, 4)])
        for c in labels
    ]
    pq.write_table(pa.table({"text": texts, "section": [f"topic{c}" for c in labels]}), path)
    return path


@pytest.fixture(scope="module")
def texts_parquet(tmp_path_factory):
    return text_task(tmp_path_factory.mktemp("text") / "texts.parquet")


@pytest.fixture(scope="module")
def static_dir(tmp_path_factory, make_static_dir):
    return make_static_dir(tmp_path_factory.mktemp("static") / "base")


def test_tables_are_read_by_sources_with_errors_naming_the_file(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "a", "label": 1}\n{"text": null, "label": 2}\n')
    table = read_table(str(data), ["text", "label"], max_rows=1)
    assert table.column("text").to_pylist() == ["a"]
    with pytest.raises(ValueError, match=r"rows\.jsonl has no column\(s\) \['section'\]; it has"):
        read_table(str(data), ["text", "section"])
    with pytest.raises(FileNotFoundError, match="cannot read .*missing.parquet"):
        read_table(str(tmp_path / "missing.parquet"), ["text"])


def test_cli_help_documents_every_option():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    for name, p in sub.choices.items():
        undocumented = [a.option_strings for a in p._actions if a.option_strings and not a.help]
        assert not undocumented, (name, undocumented)
        p.format_help()


def test_cli_local_bag_classifier_trains_evaluates_and_exports(tmp_path, texts_parquet, static_dir):
    out = tmp_path / "run"
    args = ["classify", "--data", str(texts_parquet), "--label-column", "section",
            "--init", f"static:{static_dir}", "--dims", "4,8,16", "--epochs", "3",
            "--batch-size", "32", "--lr", "0.02", "--out", str(out), "--local", "--log-every", "0"]
    assert main(args) == 0
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["head_accuracy"]) == {"4", "8", "16"}
    assert ev["head_accuracy"]["16"] > 0.8
    assert ev["knn1_accuracy"]["16"] > 0.6
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3

    # the export is a static encoder whose embedding is the trained model's
    enc = get_encoder(f"static:{out / 'export'}")
    assert enc.nesting.dims == (4, 8, 16)
    labels = json.loads((out / "export" / "heads" / "labels.json").read_text())
    assert labels["labels"] == ["topic0", "topic1", "topic2", "topic3"]

    # re-running the finished command resumes and trains nothing more
    assert main(args) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_cli_refuses_to_resume_under_other_model_settings(tmp_path, texts_parquet, static_dir):
    def args(*extra: str, epochs: str = "1") -> list[str]:
        return ["classify", "--data", str(texts_parquet), "--label-column", "section",
                "--init", f"static:{static_dir}", "--dims", "4,16", "--epochs", epochs,
                "--max-rows", "64", "--out", str(tmp_path / "run"), "--local", "--log-every",
                "0", *extra]

    assert main(args()) == 0
    with pytest.raises(ValueError, match="label_smoothing: checkpoint 0.0, given 0.1"):
        main(args("--label-smoothing", "0.1"))
    assert main(args(epochs="2")) == 0  # more epochs: the same run, resumed
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


def test_cli_local_bag_with_projection_mrl_e_and_sparse_table(tmp_path, texts_parquet, static_dir):
    out = tmp_path / "run"
    main(["classify", "--data", str(texts_parquet), "--label-column", "section",
          "--init", f"static:{static_dir}", "--embed-dim", "8", "--dims", "2,4", "--efficient",
          "--sparse-table", "--epochs", "3", "--batch-size", "32", "--lr", "0.02",
          "--out", str(out), "--local", "--log-every", "0"])
    ev = json.loads((out / "eval.json").read_text())
    assert ev["dims"] == [2, 4, 8]
    assert ev["head_accuracy"]["8"] > 0.6
    enc = get_encoder(f"static:{out / 'export'}")
    assert enc.dim == 8


def _tiny_bert(path: Path, texts: list[str]) -> Path:
    transformers = pytest.importorskip("transformers")
    from tokenizers import normalizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    transformers.BertTokenizerFast(tokenizer_object=tok, model_max_length=32).save_pretrained(path)
    config = transformers.BertConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, max_position_embeddings=32,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(path)
    return path


def test_cli_local_transformer_classifier_exports_an_hf_encoder(tmp_path, texts_parquet):
    texts = pq.read_table(texts_parquet).column("text").to_pylist()
    bert = _tiny_bert(tmp_path / "bert", texts)
    out = tmp_path / "run"
    main(["classify", "--data", str(texts_parquet), "--label-column", "section",
          "--encoder", f"hf:{bert}", "--dims", "4,16", "--epochs", "1", "--batch-size", "32",
          "--max-rows", "200", "--out", str(out), "--local", "--log-every", "0"])
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["head_accuracy"]) == {"4", "16"}
    enc = get_encoder(f"hf:{out / 'export'}", device="cpu", nesting=[4])
    assert enc.encode(["w1 w2 w3"]).shape == (1, 16)


# ---------------------------------------------------------------------------------------------
# images


def _png(color) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (36, 36), color).save(buf, format="PNG")
    return buf.getvalue()


def _samples(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        label = i % 2
        base = np.array([200, 30, 30]) if label == 0 else np.array([30, 30, 200])
        yield f"s{i:04d}", _png(tuple(int(v) for v in base + rng.integers(-20, 20, 3))), label


def _tar(path: Path, samples) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, png, label in samples:
            for ext, data in (("png", png), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _shards(tmp_path: Path, count: int, seed: int = 0) -> str:
    """``count`` WebDataset shards of 8 labelled images each; their brace pattern."""
    shards = tmp_path / "shards"
    shards.mkdir()
    samples = list(_samples(8 * count, seed))
    for s in range(count):
        _tar(shards / f"shard-{s:03d}.tar", samples[s * 8 : (s + 1) * 8])
    return str(shards / f"shard-{{000..{count - 1:03d}}}.tar")


def test_cli_local_images_from_webdataset_shards(tmp_path):
    pytest.importorskip("torchvision")
    out = tmp_path / "run"
    main(["classify", "--modality", "image", "--data", _shards(tmp_path, 3),
          "--encoder", "torchvision:resnet18", "--image-size", "32", "--dims", "8,64,512",
          "--epochs", "1", "--batch-size", "8", "--out", str(out), "--local", "--log-every", "0"])
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["head_accuracy"]) == {"8", "64", "512"}  # the last shard is the validation set
    state = torch.load(out / "export" / "model.pt", weights_only=True)
    assert "fc.nesting_classifier_0.weight" in state and "conv1.weight" in state


def test_streamed_webdataset_lr_schedule_ends_at_zero_on_the_last_step(tmp_path):
    pytest.importorskip("torchvision")
    pattern = _shards(tmp_path, 3)  # 8 samples each; the last shard is the validation set
    counts, labels = scan_shards(expand_shards(pattern))
    assert list(counts.values()) == [8, 8, 8] and labels == {"0", "1"}
    out = tmp_path / "run"
    main(["classify", "--modality", "image", "--data", pattern, "--encoder",
          "torchvision:resnet18", "--image-size", "32", "--dims", "8,512", "--epochs", "2",
          "--batch-size", "8", "--lr", "0.01", "--out", str(out), "--local", "--log-every", "0"])
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # 16 training samples, 8 a batch: 2 steps an epoch, 4 in all; the cosine is halfway after
    # the first epoch and at 0 after the last step (not before, not later)
    assert [e["step"] for e in epochs] == [2, 4]
    assert epochs[0]["lr"] == pytest.approx(0.005, rel=1e-6)
    assert epochs[1]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_cli_local_timm_backbone_trains_and_exports_its_weights(tmp_path):
    timm = pytest.importorskip("timm")
    out = tmp_path / "run"
    main(["classify", "--modality", "image", "--data", _shards(tmp_path, 2, seed=1),
          "--encoder", "timm:test_resnet", "--image-size", "32", "--dims", "8,32,96",
          "--epochs", "1", "--batch-size", "8", "--out", str(out), "--local", "--log-every", "0"])
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["head_accuracy"]) == {"8", "32", "96"}  # 96: test_resnet's feature width
    state = torch.load(out / "export" / "model.pt", weights_only=True)
    heads = {k for k in state if k.startswith("fc.")}
    assert heads == {f"fc.nesting_classifier_{i}.{p}" for i in range(3) for p in ("weight", "bias")}
    net = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    net.load_state_dict({k: v for k, v in state.items() if k not in heads}, strict=True)


def test_cli_local_resnet50_from_parquet_loads_as_mrl_resnet50(tmp_path):
    pytest.importorskip("torchvision")
    rows = list(_samples(12))
    data = tmp_path / "images.parquet"
    pq.write_table(pa.table({"image": [r[1] for r in rows], "label": [r[2] for r in rows]}), data)
    out = tmp_path / "run"
    main(["classify", "--modality", "image", "--data", str(data), "--image-size", "32",
          "--dims", "8,2048", "--epochs", "1", "--batch-size", "6", "--val-fraction", "0.25",
          "--knn-rows", "0", "--out", str(out), "--local", "--log-every", "0"])
    enc = get_encoder(f"mrl-resnet50:{out / 'export' / 'model.pt'}", device="cpu")
    assert enc.dim == 2048 and enc.nesting.dims == (8, 2048)


# ---------------------------------------------------------------------------------------------
# exports embed as the trained model did: one pooling and preprocessing for training and serving


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@torch.inference_mode()
def _training_forward(parts: dict, dataset) -> np.ndarray:
    encoder = parts["model"].eval().encoder
    return encoder(parts["collate"]([dataset[i] for i in range(len(dataset))])).numpy()


@pytest.mark.parametrize("kind", ["bag", "hf-mean", "hf-cls", "image"])
def test_the_export_embeds_as_the_training_forward_did(kind, tmp_path, texts_parquet, static_dir):
    fit_cfg = FitConfig(epochs=1, batch_size=16, lr=0.02, log_every=0)
    texts = pq.read_table(texts_parquet).column("text").to_pylist()[:32]
    common = {"out": str(tmp_path / "run"), "label_column": "section", "val_fraction": 0.0,
              "max_rows": 32, "fit": fit_cfg}
    if kind == "bag":  # the projection is folded into the table; texts cut at 6 tokens both ways
        job = ClassifierJob(data=str(texts_parquet), init=f"static:{static_dir}", embed_dim=8,
                            dims="4,8", max_length=6, **common)
    elif kind.startswith("hf"):
        bert = _tiny_bert(tmp_path / "bert", texts)
        job = ClassifierJob(data=str(texts_parquet), encoder=f"hf:{bert}", dims="4,16",
                            pooling=kind[3:], **common)
    else:
        pytest.importorskip("torchvision")
        rows = list(_samples(4))
        data = tmp_path / "images.parquet"
        pq.write_table(pa.table({"image": [r[1] for r in rows], "label": [r[2] for r in rows]}),
                       data)
        common.update(label_column="label", fit=FitConfig(epochs=1, batch_size=2, log_every=0))
        job = ClassifierJob(data=str(data), modality="image", encoder="resnet50", image_size=32,
                            dims="8,2048", **common)
    parts = build_classifier(job, QUIET)
    fit(parts["objective"], parts["train"], parts["collate"], job.fit, job.out, QUIET)
    export = tmp_path / "run" / "export"
    export_classifier(job, parts, export)

    if kind == "image":  # served at the standard 224 crop: compare the training eval transform
        inputs = [r[1] for r in rows]
        dataset = ImageDataset(inputs, np.zeros(len(inputs)), image_transform(224, train=False))
        served = get_encoder(f"mrl-resnet50:{export / 'model.pt'}", device="cpu")
    else:
        inputs, dataset = texts, parts["train"]  # val_fraction 0: the rows in input order
        prefix = "static" if kind == "bag" else "hf"
        served = get_encoder(f"{prefix}:{export}", device="cpu")
    trained = _training_forward(parts, dataset)
    embedded = served.encode(inputs)
    assert embedded.shape == trained.shape
    assert _cosines(trained, embedded).min() >= 0.9999
    assert served.nesting.dims == parts["nesting"].dims


# ---------------------------------------------------------------------------------------------
# the adaptor through the CLI, and Ray Train


def test_adaptor_data_cache_is_rebuilt_when_its_settings_change(tmp_path, caplog):
    rng = np.random.default_rng(0)
    first, second = tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(first, rng.standard_normal((120, 8)).astype(np.float32))
    np.save(second, rng.standard_normal((90, 8)).astype(np.float32))
    job = AdaptorJob(out=str(tmp_path / "ad"), embeddings=str(first), max_rows=None,
                     holdout=20, neighbours=4)
    data = prepare_adaptor_data(job)
    built = (data / "knn.npy").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mrl_core.training"):
        assert prepare_adaptor_data(job) == data  # same settings: the cache is reused
    assert (data / "knn.npy").stat().st_mtime_ns == built and not caplog.records

    def rebuilt(**changes) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="mrl_core.training"):
            prepare_adaptor_data(job.__class__(**{**job.__dict__, **changes}))
        return [r.getMessage() for r in caplog.records if "rebuilding" in r.getMessage()]

    assert any("holdout: cache 20, given 30" in m for m in rebuilt(holdout=30))
    assert np.load(data / "holdout.npy").shape == (30, 8)
    assert any("embeddings: cache" in m for m in rebuilt(embeddings=str(second)))
    assert np.load(data / "train.npy").shape == (90 - 20, 8)
    assert any("neighbours: cache 4, given 6" in m for m in rebuilt(neighbours=6))
    assert np.load(data / "knn.npy").shape == (100, 6)
    assert any("seed: cache 0, given 3" in m
               for m in rebuilt(fit=FitConfig(**{**job.fit.__dict__, "seed": 3})))
    assert any("max_rows: cache None, given 50" in m for m in rebuilt(max_rows=50))
    assert np.load(data / "train.npy").shape == (30, 8)


def test_cli_local_adaptor_round_trips_through_get_encoder(tmp_path, static_dir):
    rng = np.random.default_rng(0)
    texts = [" ".join(f"w{w}" for w in rng.integers(0, 60, 5)) for _ in range(700)]
    data = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"summary": texts}), data)
    out = tmp_path / "ad"
    main(["adaptor", "--base", f"static:{static_dir}", "--data", str(data),
          "--text-column", "summary", "--dims", "4,8", "--holdout", "100", "--neighbours", "8",
          "--epochs", "2", "--batch-size", "128", "--out", str(out), "--local", "--log-every", "0"])
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["recall@10"]) == {"raw", "pca", "adaptor"}
    enc = get_encoder(f"adaptor:{out / 'adaptor'}")
    assert enc.nesting.dims == (4, 8, 16)
    base = get_encoder(f"static:{static_dir}")
    y, x = enc.encode(texts[:5]), base.encode(texts[:5])
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(y @ y.T, xn @ xn.T, atol=1e-4)  # orthogonal: same geometry


def test_ray_train_one_cpu_worker(tmp_path, texts_parquet, static_dir):
    out = tmp_path / "ray-run"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / "train.py"), "classify",
         "--data", str(texts_parquet), "--label-column", "section",
         "--init", f"static:{static_dir}", "--dims", "4,16", "--epochs", "2",
         "--batch-size", "32", "--out", str(out), "--num-workers", "1", "--log-every", "0"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert latest_checkpoint(out).name == "epoch-0002"
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["head_accuracy"]) == {"4", "16"}
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_training_lists_shards_as_the_embed_job_does(tmp_path):
    tmp_path = Path(os.path.realpath(tmp_path))
    for part in ("train", "extra"):
        (tmp_path / part).mkdir()
        for i in range(2):
            (tmp_path / part / f"s-{i:03d}.tar").write_bytes(b"")
        (tmp_path / part / "notes.txt").write_text("not a shard")
    train = [str(tmp_path / "train" / f"s-{i:03d}.tar") for i in range(2)]
    extra = [str(tmp_path / "extra" / f"s-{i:03d}.tar") for i in range(2)]
    assert expand_shards(str(tmp_path / "{train,extra}" / "*.tar")) == sorted(extra + train)
    assert expand_shards(str(tmp_path / "train" / "s-{000..001}.tar")) == train
    assert expand_shards(str(tmp_path / "train")) == train, "a directory's other files are left out"
    assert expand_shards(train[0]) == train[:1]
    with pytest.raises(FileNotFoundError, match="s-002.tar does not exist"):
        expand_shards(str(tmp_path / "train" / "s-{000..005}.tar"))
