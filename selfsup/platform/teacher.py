"""The frozen teacher of `distill` (`method.teacher`): a selfsup run's backbone (its newest good
checkpoint) or an export folder (timm, safetensors, torchscript). `check_teacher` runs on the driver
before Ray starts and reads only the teacher's config or selfsup.json; `attach_teacher` loads it on
each training worker."""

from __future__ import annotations

import json

from selfsup.pipelines.endpoints import Endpoint, resolve_endpoint
from selfsup.pipelines.storage import is_s3, open_store
from selfsup.platform.config import Config, ConfigError
from selfsup.platform.evaluate import run_config
from selfsup.platform.export import META, _input, _per_channel, load_backbone
from selfsup.platform.runs import CONFIG, RunError


def _endpoint(uri: str, ep: Endpoint | None) -> Endpoint | None:
    return ep or (resolve_endpoint() if is_s3(uri) else None)


def check_teacher(cfg: Config, ep: Endpoint | None = None) -> None:
    """ConfigError or RunError (one line) unless method.teacher is a run or an export that takes the
    student's input: the same channels, size and normalisation."""
    uri = cfg.method_params()["teacher"]
    ep = _endpoint(uri, ep)
    store = open_store(uri, ep)
    if store.exists(META):
        meta = json.loads(store.read(META))
        chans, size, mean, std = meta["input_size"][0], meta["input_size"][1], meta["mean"], meta["std"]
    elif store.exists(CONFIG):
        chans, size, mean, std = _input(run_config(uri, ep))
    else:
        raise RunError(f"method.teacher {uri}: no selfsup run ({CONFIG}) or export ({META}) there")
    v = cfg.data.views
    if chans != cfg.model.in_chans:
        raise ConfigError(f"method.teacher {uri} takes {chans}-channel images, the student {cfg.model.in_chans} "
                          "(model.in_chans)")
    if {v.view0.size, v.view1.size} != {size}:
        raise ConfigError(f"method.teacher {uri} takes {size} px images, the student's views are "
                          f"{v.view0.size} and {v.view1.size} px (data.views.view0.size, data.views.view1.size)")
    if _per_channel(cfg.data.mean, chans) != mean or _per_channel(cfg.data.std, chans) != std:
        raise ConfigError(f"method.teacher {uri} takes images normalised with mean {mean} and std {std}: "
                          "set data.mean and data.std to those")


def attach_teacher(method, cfg: Config, ep: Endpoint | None = None) -> None:
    """Load method.teacher and hand it to a method that takes one (distill); others are left as they are."""
    if not hasattr(method, "set_teacher"):
        return
    uri = cfg.method_params()["teacher"]
    backbone = load_backbone(uri, ep=_endpoint(uri, ep))
    size = cfg.data.views.view0.size
    method.set_teacher(backbone.model.float(), (cfg.model.in_chans, size, size))
