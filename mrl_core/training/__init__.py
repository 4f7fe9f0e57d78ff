"""Training Matryoshka models, importable without Ray.

- ``modules``: the encoders that train (token bag, Hugging Face transformer, image backbone) and
  ``NestedClassifier``; they pool as the serving encoders do (``mrl_core.encoders.pooling``).
- ``objectives``: ``ClassifierObjective`` (the Matryoshka classification loss) and
  ``AdaptorObjective`` (``NeighbourhoodLoss``, optionally plus the contrastive loss).
- ``data``: datasets, collate functions, the WebDataset image stream, labels and splits.
- ``loop``: ``FitConfig``, ``Runner`` (rank, device, DDP, reporting to Ray) and ``fit``.
- ``checkpoints``: per-epoch checkpoints, with the settings they were trained under.
- ``classifier_job`` / ``adaptor_job``: what ``pipelines/train.py`` runs, from reading the
  data to the exported model.

Everything logs through ``logging`` (``mrl_core.training.*``); nothing prints.
"""

from mrl_core.encoders.images import decode_image
from mrl_core.sources import read_table
from mrl_core.training.adaptor_job import (
    AdaptorJob,
    prepare_adaptor_data,
    run_adaptor_job,
    train_adaptor,
)
from mrl_core.training.checkpoints import (
    CHECKPOINTS,
    STATE_FILE,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    write_json,
)
from mrl_core.training.classifier_job import (
    ClassifierJob,
    build_classifier,
    evaluate_classifier,
    export_classifier,
    run_classifier_job,
)
from mrl_core.training.data import (
    ImageDataset,
    NeighbourDataset,
    TokenDataset,
    WebDatasetStream,
    collate_bag,
    collate_images,
    collate_neighbours,
    collate_padded,
    image_transform,
    iter_webdataset,
    label_index,
    split_rows,
)
from mrl_core.training.loop import METRICS_FILE, FitConfig, Runner, embed_with, fit, predict
from mrl_core.training.modules import (
    HFTextEncoder,
    ImageBackbone,
    NestedClassifier,
    TokenBagEncoder,
)
from mrl_core.training.objectives import AdaptorObjective, ClassifierObjective

__all__ = [
    "CHECKPOINTS", "METRICS_FILE", "STATE_FILE",
    "AdaptorJob", "AdaptorObjective", "ClassifierJob", "ClassifierObjective", "FitConfig",
    "HFTextEncoder", "ImageBackbone", "ImageDataset", "NestedClassifier", "NeighbourDataset",
    "Runner", "TokenBagEncoder", "TokenDataset", "WebDatasetStream",
    "build_classifier", "collate_bag", "collate_images", "collate_neighbours", "collate_padded",
    "decode_image", "embed_with", "evaluate_classifier", "export_classifier", "fit",
    "image_transform", "iter_webdataset", "label_index", "latest_checkpoint", "load_checkpoint",
    "predict", "prepare_adaptor_data", "prune_checkpoints", "read_table", "run_adaptor_job",
    "run_classifier_job", "save_checkpoint", "split_rows", "train_adaptor", "write_json",
]
